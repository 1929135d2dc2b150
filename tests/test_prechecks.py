"""What the commands check before Ray starts, and `rwkvray validate`: exact one-line messages, Ray never started."""
import os
import socket

import pytest
import yaml

from rwkvray.cli import main

SAMPLE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl"))
TRAINING_BLOCKS = "run, model, data, peft, optim, trainer, deepspeed, scaling, logging"


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model):
    return make_tiny_model(2, 64)


@pytest.fixture
def write_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a spec's default ./runs must not meet another test's runs
    def write(blocks: dict, name: str = "job.yaml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(blocks))
        return str(path)
    return write


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ray_started() -> bool:
    import ray
    return ray.is_initialized()


def refused_port() -> int:
    """A local port where nothing listens (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- validate


def test_validate_checks_the_checkpoint_shape(capsys, write_spec, tiny_model):
    spec = write_spec({"model": {"path": tiny_model, "n_layer": 2, "n_embd": 64}, "data": {"file": SAMPLE}})
    assert cli(capsys, "validate", spec) == (0, f"{spec}: ok, a train spec ({TRAINING_BLOCKS}); model n_layer 2, n_embd 64\n", "")

    spec = write_spec({"model": {"path": tiny_model, "n_layer": 3, "n_embd": 128}, "data": {"file": SAMPLE}})
    expected = f"error: {spec}: model {tiny_model} has n_layer=2 but the spec expects 3; n_embd=64 but the spec expects 128\n"
    assert cli(capsys, "validate", spec) == (2, "", expected)


def test_validate_no_check_files_accepts_files_that_live_on_the_cluster(capsys, write_spec, tmp_path):
    spec = write_spec({"model": {"path": "/models/rwkv7-1.5b.pth", "n_layer": 24},
                       "data": {"file": "/data/chats.jsonl"}, "peft": {"state": {"init_from": "/data/s.pth"}}})
    assert cli(capsys, "validate", "--no-check-files", spec) == (0, f"{spec}: ok, a train spec ({TRAINING_BLOCKS}); files not checked\n", "")
    assert cli(capsys, "validate", spec) == (2, "", f"error: {spec}: model.path: file not found: /models/rwkv7-1.5b.pth; "
                                                    "data.file: file not found: /data/chats.jsonl; "
                                                    "peft.state.init_from: file not found: /data/s.pth\n")


def test_validate_no_check_files_still_checks_values(capsys, write_spec):
    spec = write_spec({"model": {"path": "/models/m.pth"}, "data": {"file": "/data/d", "type": "binidx"},
                       "optim": {"lr_init": -1}})
    assert cli(capsys, "validate", "--no-check-files", spec) == (2, "", f"error: {spec}: optim.lr_init: must be > 0\n")


def test_a_ray_serve_config_file_is_recognised(capsys, write_spec, tiny_model):
    app = {"name": "rwkvray", "route_prefix": "/", "import_path": "rwkvray.launch.serving:app_builder",
           "args": {"model": tiny_model, "api_key_env": "RWKVRAY_API_KEY"}}
    other = {"name": "other", "import_path": "somewhere.else:app"}
    config = write_spec({"http_options": {"port": 8000}, "applications": [app, other]}, "serve_config.yaml")
    assert cli(capsys, "validate", config) == (
        0, f"{config}: ok, a Ray Serve config file with 1 rwkvray application(s); start it with `serve run {config}`\n", "")
    for command in ("run", "tune", "serve"):
        assert cli(capsys, command, config) == (
            2, "", f"error: {config}: this is a Ray Serve config file (it has applications and http_options), not an "
                   f"rwkvray job spec: start it with `serve run {config}`, or `serve deploy {config}` on a running cluster\n")
    assert not ray_started()


def test_a_ray_serve_config_file_names_its_bad_args_in_its_own_terms(capsys, write_spec):
    app = {"name": "rwkvray", "import_path": "rwkvray.launch.serving:app_builder",
           "args": {"model": "/models/m.pth", "replica": 2}}
    config = write_spec({"applications": [app]}, "serve_config.yaml")
    assert cli(capsys, "validate", "--no-check-files", config) == (
        2, "", f"error: {config}: applications[0].args: replica: unknown key (did you mean replicas?)\n")
    app["args"] = {"model": "/models/m.pth"}
    config = write_spec({"applications": [app]}, "serve_config.yaml")
    assert cli(capsys, "validate", config) == (
        2, "", f"error: {config}: applications[0].args: model: file not found: /models/m.pth\n")
    assert cli(capsys, "validate", "--no-check-files", config) == (
        0, f"{config}: ok, a Ray Serve config file with 1 rwkvray application(s); files not checked; "
           f"start it with `serve run {config}`\n", "")


def test_the_repository_serve_config_validates_without_its_files(capsys):
    code, out, _ = cli(capsys, "validate", "--no-check-files", "jobs/serve_config.yaml")
    assert (code, out) == (0, "jobs/serve_config.yaml: ok, a Ray Serve config file with 1 rwkvray application(s); "
                              "files not checked; start it with `serve run jobs/serve_config.yaml`\n")


# ---------------------------------------------------------------- checks before Ray


def test_serve_without_its_api_key_variable_fails_before_ray_starts(capsys, write_spec, tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("RWKVRAY_TEST_NO_SUCH_KEY", raising=False)
    spec = write_spec({"serve": {"model": tiny_model, "states_dir": str(tmp_path / "states"),
                                 "api_key_env": "RWKVRAY_TEST_NO_SUCH_KEY"}})
    assert cli(capsys, "serve", spec) == (
        2, "", "error: serve.api_key_env: the environment variable RWKVRAY_TEST_NO_SUCH_KEY is not set "
               "(set it, or remove api_key_env to serve without a key)\n")
    assert not ray_started()


def test_serve_refuses_a_file_that_is_not_a_checkpoint_before_ray_starts(capsys, write_spec, tmp_path):
    model = tmp_path / "model.pth"
    model.write_bytes(b"not a checkpoint")
    spec = write_spec({"serve": {"model": str(model), "states_dir": str(tmp_path / "states")}})
    assert cli(capsys, "serve", spec) == (
        2, "", f"error: {model}: not a PyTorch checkpoint (torch.load cannot read it)\n")
    assert not ray_started()


@pytest.mark.parametrize("command", ["run", "tune"])
def test_a_shape_mismatch_fails_before_ray_starts(capsys, write_spec, tiny_model, command):
    spec = write_spec({"model": {"path": tiny_model, "n_layer": 12}, "data": {"file": SAMPLE, "holdout_fraction": 0.2},
                       "tune": {"space": {"lr_init": {"loguniform": [1e-3, 1e-1]}}}})
    assert cli(capsys, command, spec) == (2, "", f"error: {spec}: model {tiny_model} has n_layer=2 but the spec expects 12\n")
    assert not ray_started()


def test_tune_without_a_tune_block_fails_before_ray_starts(capsys, write_spec, tiny_model):
    spec = write_spec({"model": {"path": tiny_model}, "data": {"file": SAMPLE}})
    assert cli(capsys, "tune", spec) == (
        2, "", f"error: {spec}: tune: required for rwkvray tune (this is a train spec, for rwkvray run)\n")
    assert not ray_started()


def test_validate_names_the_kind_of_spec(capsys, write_spec, tiny_model, tmp_path):
    tune = write_spec({"model": {"path": tiny_model}, "data": {"file": SAMPLE, "holdout_fraction": 0.2},
                       "tune": {"space": {"lr_init": {"loguniform": [1e-3, 1e-1]}}}}, "tune.yaml")
    assert cli(capsys, "validate", tune) == (
        0, f"{tune}: ok, a tune spec ({TRAINING_BLOCKS}, tune, eval); model n_layer 2, n_embd 64\n", "")
    serve = write_spec({"serve": {"model": tiny_model, "states_dir": str(tmp_path / "states")}}, "serve.yaml")
    assert cli(capsys, "validate", serve) == (0, f"{serve}: ok, a serve spec (serve)\n", "")
    assert cli(capsys, "validate", "--no-check-files", serve) == (0, f"{serve}: ok, a serve spec (serve); files not checked\n", "")


@pytest.mark.parametrize("command", ["run", "tune"])
def test_a_serve_spec_given_to_a_training_command_fails_in_one_line(capsys, write_spec, tiny_model, tmp_path, command):
    spec = write_spec({"serve": {"model": tiny_model, "states_dir": str(tmp_path / "states")}})
    assert cli(capsys, command, spec) == (
        2, "", f"error: {spec}: model: required for rwkvray {command} (this is a serve spec, for rwkvray serve)\n")
    assert not ray_started()


def test_a_train_spec_given_to_serve_fails_in_one_line(capsys, good_spec):
    assert cli(capsys, "serve", good_spec) == (
        2, "", f"error: {good_spec}: serve: required for rwkvray serve (this is a train spec, for rwkvray run)\n")
    assert not ray_started()


# ---------------------------------------------------------------- --address


@pytest.fixture
def good_spec(write_spec, tiny_model):
    return write_spec({"model": {"path": tiny_model}, "data": {"file": SAMPLE}})


def test_an_address_where_nothing_listens_fails_at_once_naming_it(capsys, good_spec, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{refused_port()}"
    assert cli(capsys, "run", good_spec, "--address", address) == (
        2, "", f"error: --address {address}: nothing listens there (connection refused); start a head there with "
               "`ray start --head`, or leave out the address to use a local Ray instance\n")
    assert not ray_started()


def test_a_bad_ray_address_variable_is_named_as_such(capsys, good_spec, monkeypatch):
    address = f"127.0.0.1:{refused_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert cli(capsys, "run", good_spec) == (
        2, "", f"error: RAY_ADDRESS={address}: nothing listens there (connection refused); start a head there with "
               "`ray start --head`, or leave out the address to use a local Ray instance\n")
    assert not ray_started()


@pytest.mark.parametrize("address, message", [
    ("http://10.0.0.5:8265", "that is a dashboard URL (for `ray job submit`); rwkvray joins the cluster itself: "
                             "give the head's HOST:PORT (port 6379 by default)"),
    ("10.0.0.5", "expected HOST:PORT of a Ray head, for example 10.0.0.5:6379"),
])
def test_malformed_addresses(capsys, good_spec, address, message):
    assert cli(capsys, "run", good_spec, "--address", address) == (2, "", f"error: --address {address}: {message}\n")
    assert not ray_started()


def test_a_serve_port_in_use_fails_before_ray_starts(capsys, write_spec, tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = write_spec({"serve": {"model": tiny_model, "states_dir": str(tmp_path / "states"), "port": port}})
        assert cli(capsys, "serve", spec) == (
            2, "", f"error: {spec}: serve.port: 127.0.0.1:{port} is in use by another program (choose another serve.port)\n")
    assert not ray_started()


def test_an_output_folder_that_cannot_be_made_fails_before_ray_starts(capsys, write_spec, tiny_model, tmp_path):
    (tmp_path / "a-file").write_text("x")
    spec = write_spec({"run": {"storage_path": str(tmp_path / "a-file" / "runs")},
                       "model": {"path": tiny_model}, "data": {"file": SAMPLE}})
    assert cli(capsys, "run", spec) == (
        2, "", f"error: {spec}: run.storage_path: cannot make {tmp_path}/a-file/runs: {tmp_path}/a-file is a file\n")
    assert cli(capsys, "train", "--load_model", tiny_model, "--data_file", SAMPLE, "--proj_dir", str(tmp_path / "a-file" / "out")) == (
        2, "", f"error: train flags: --proj_dir: cannot make {tmp_path}/a-file/out: {tmp_path}/a-file is a file\n")
    assert not ray_started()



@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_a_local_ray_instance_cannot_have_are_refused_before_it_starts(capsys, write_spec, tiny_model, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = write_spec({"model": {"path": tiny_model}, "data": {"file": SAMPLE},
                       "scaling": {"num_workers": 2, "use_gpu": True}})
    assert cli(capsys, "run", spec) == (
        2, "", f"error: {spec}: scaling.use_gpu: the run needs 2 GPU(s) and this machine has 0, with no --address or "
               "RAY_ADDRESS naming a cluster that has them\n")
    assert cli(capsys, "train", "--load_model", tiny_model, "--data_file", SAMPLE, "--accelerator", "gpu",
               "--devices", "2") == (
        2, "", "error: train flags: --accelerator gpu: the run needs 2 GPU(s) and this machine has 0, with no "
               "RAY_ADDRESS naming a cluster that has them\n")
    assert cli(capsys, "train", "--load_model", tiny_model, "--data_file", SAMPLE, "--accelerator", "gpu") == (
        2, "", "error: train flags: --accelerator gpu: the run needs 1 GPU(s) and this machine has 0, with no "
               "RAY_ADDRESS naming a cluster that has them\n")
    spec = write_spec({"serve": {"model": tiny_model, "use_gpu": True, "port": refused_port()}})
    assert cli(capsys, "serve", spec) == (
        2, "", f"error: {spec}: serve.use_gpu: 1 replica(s) need a GPU each and this machine has 0, with no --address "
               "or RAY_ADDRESS naming a cluster that has them (use_gpu: auto serves on the CPU)\n")
    assert not ray_started()


# ---------------------------------------------------------------- data files


def test_every_bad_data_line_is_listed_before_ray_starts(capsys, write_spec, tiny_model, tmp_path):
    good = '{"text": "User: hi\\n\\nAssistant: hello"}\n'
    data = tmp_path / "bad.jsonl"
    data.write_bytes((good * 3 + '{"text": "unterminated\n' + good + '{"text": "User: no reply"}\n' + "\n").encode()
                     + b"\xff\xfe\n" + good.encode())
    spec = write_spec({"model": {"path": tiny_model}, "data": {"file": str(data), "loss_mask": "qa"}})
    code, out, err = cli(capsys, "run", spec)
    assert (code, out) == (2, "")
    assert err == (f"error: {spec}: data.file: {data} has bad lines; nothing was started:\n"
                   f"{data}:4: not valid JSON (Unterminated string starting at at column 10)\n"
                   f"{data}:6: loss_mask 'qa' needs an assistant turn ('Assistant:') and this line has none\n"
                   f"{data}:8: not valid UTF-8\n")
    assert not ray_started()


def test_the_data_check_stops_listing_at_its_cap(capsys, write_spec, tiny_model, tmp_path):
    from rwkvray.train.data import MAX_LISTED_PROBLEMS
    data = tmp_path / "all-bad.jsonl"
    data.write_text("[1]\n" * (MAX_LISTED_PROBLEMS + 5))
    spec = write_spec({"model": {"path": tiny_model}, "data": {"file": str(data)}})
    code, _, err = cli(capsys, "run", spec)
    lines = err.splitlines()
    assert code == 2 and len(lines) == MAX_LISTED_PROBLEMS + 2
    assert lines[1] == f'{data}:1: expected a JSON object with exactly one of "text" or "messages"'
    assert lines[-1] == f"{data}: stopped after {MAX_LISTED_PROBLEMS} bad lines; there may be more"
    assert not ray_started()
