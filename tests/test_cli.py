"""The `rwkvray` command as a user meets it: one-line errors, no tracebacks, RWKV-PEFT command lines that run."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from rwkvray.cli import main
from rwkvray.model.state_file import load_state

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model):
    return make_tiny_model(2, 64)


def run_cli(*args):
    """The console script in a subprocess, so a traceback would show in stderr."""
    return subprocess.run([sys.executable, "-m", "rwkvray.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("make_file, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(os.urandom(300)), "not a PyTorch checkpoint"),
    (lambda p: torch.save({"blocks.0.att.time_maa_x": torch.zeros(1, 1, 64), "emb.weight": torch.zeros(10, 64)}, p),
     "missing key 'blocks.0.att.time_faaaa'"),
])
def test_bad_checkpoints_give_one_line_without_traceback(tmp_path, make_file, message):
    path = tmp_path / "model.pth"
    make_file(path)
    done = run_cli("generate", "--model", str(path), "--prompt", "hi")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.ray
def test_rwkv_peft_state_tuning_command_line_trains(tiny_model, tmp_path, capsys):
    command = f"""--load_model {tiny_model} --proj_dir {tmp_path / 'out'} --data_file {SAMPLE} --data_type jsonl
        --vocab_size 65536 --ctx_len 32 --micro_bsz 2 --epoch_steps 3 --epoch_count 2 --epoch_save 1
        --lr_init 1e-2 --lr_final 1e-4 --warmup_steps 1 --lr_schedule cos_decay --precision fp32 --grad_cp 1
        --peft state --op torch --random_seed 7 --accelerator cpu --devices 1 --strategy deepspeed_stage_1
        --n_layer 2 --n_embd 64 --my_testing x070 --loss_mask qa"""
    assert main(["train", *shlex.split(command)]) == 0
    for name in ("rwkv-0.pth", "rwkv-1.pth", "rwkv-final.pth", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "out" / name).exists(), name
    assert load_state(str(tmp_path / "out" / "rwkv-final.pth")).time_state.shape == (2, 1, 64, 64)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert f"loss {sum(losses[:3]) / 3:.3f} -> {sum(losses[3:]) / 3:.3f} over 6 steps" in capsys.readouterr().out


def test_n_layer_flag_that_does_not_match_the_checkpoint_is_refused(tiny_model, tmp_path, capsys):
    command = f"--load_model {tiny_model} --proj_dir {tmp_path} --data_file {SAMPLE} --n_layer 24 --accelerator cpu"
    assert main(["train", *shlex.split(command)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n_layer=2 but the spec expects 24" in err


@pytest.mark.parametrize("spec_text, message", [
    ("model: {path: nowhere.pth}\ndata: {file: nowhere.jsonl}\n", "model.path: file not found"),
    ("scaling: {num_workers: 0}\n", "scaling.num_workers: must be ≥ 1"),
    ("optim: {lr_init: -1}\n", "optim.lr_init: must be > 0"),
    ("trainer: {epochs: 3}\n", "trainer.epochs: unknown key"),
])
def test_run_refuses_bad_specs_before_starting_ray(tmp_path, tiny_model, capsys, spec_text, message):
    import ray
    base = f"model: {{path: {tiny_model}}}\ndata: {{file: {SAMPLE}}}\n" if "model:" not in spec_text else ""
    spec = tmp_path / "spec.yaml"
    spec.write_text(base + spec_text)
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not ray.is_initialized()


def test_init_model_writes_the_same_bytes_every_time_on_any_number_of_threads(tmp_path, capsys):
    """A state tuned on one copy of a model must fit the next copy made by the same command (demo.sh, a cluster's
    entrypoint): QR sums in a thread-dependent order, and torch.save names its archive after the file."""
    import hashlib
    threads, digests = torch.get_num_threads(), []
    try:
        for n, name in ((1, "one.pth"), (2, "two.pth"), (2, "again.pth")):
            torch.set_num_threads(n)
            assert main(["init-model", "--n-layer", "1", "--n-embd", "64", "--vocab-size", "1000",
                         "--perturb", "0.2", "--out", str(tmp_path / name)]) == 0
            digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1] == digests[2], digests
