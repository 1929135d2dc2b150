import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.model.init import default_dims, default_dims_x060, init_weights
from tests import worker_hooks
from tests.helpers import TINY, free_port, random_model, saved_base, token_batch

pytest_plugins = ["tests.triton_interp"]  # the Triton interpreter for FLA's kernels when there is no GPU


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: without it they are skipped, with one reason (benchmarks/gpu_check.sh runs
    them with `pytest -m gpu`)."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="marked gpu: needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(no_gpu)


@pytest.fixture(scope="session", autouse=True)
def native_threads_end_with_the_session():
    """Stop, before the interpreter exits, what a test left running in this process: a Ray connection and a
    torch.distributed process group. Their C++ threads otherwise still run while the interpreter tears down the
    objects they use, and pytest died after its summary ("pure virtual method called", exit 139)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def deepspeed_world():
    """A child process in a gloo world of one, for tests that run DeepSpeed's engine outside Ray: DeepSpeed's comm
    layer keeps gloo's C++ threads alive after the group is destroyed, and in the pytest process they crashed
    the interpreter's exit ("pure virtual method called", exit 139). Submit module-level functions to it."""
    import concurrent.futures
    import multiprocessing
    from tests.helpers import join_world_of_one
    with concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context("spawn"),
                                                initializer=join_world_of_one) as child:
        yield child


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory):
    """A checkpoint file of a tiny full-vocab x070 or x060 model (RWKV-LM init, perturbed so a state can change
    its output)."""
    made = {}

    def make(n_layer: int, n_embd: int, version: str = "x070") -> str:
        if (n_layer, n_embd, version) not in made:
            path = str(tmp_path_factory.mktemp("model") / f"tiny-{version}-{n_layer}x{n_embd}.pth")
            dims = (default_dims_x060 if version == "x060" else default_dims)(n_layer, n_embd)
            save_checkpoint(init_weights(dims, seed=0, perturb=0.2), path)
            made[n_layer, n_embd, version] = path
        return made[n_layer, n_embd, version]

    return make


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A cwd holding the files that specs and RWKV-PEFT flags in the tests name relatively: models (m.pth,
    model.pth), jsonl files (d.jsonl, chats.jsonl) and binidx pairs (p, data/test-1)."""
    for name in ("m.pth", "d.jsonl", "p.bin", "p.idx", "model.pth"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "chats.jsonl").write_text('{"text": "User: hi\\n\\nAssistant: hello"}\n')
    (tmp_path / "data").mkdir()
    for suffix in (".bin", ".idx"):
        (tmp_path / "data" / ("test-1" + suffix)).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model):
    """A 2-layer, 128-wide x070 checkpoint file (see make_tiny_model)."""
    return make_tiny_model(2, 128)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    """A checkpoint file of `helpers.random_model()` (TINY dims, every parameter random), for the PEFT tests."""
    return saved_base(tmp_path_factory, random_model())


@pytest.fixture(scope="module")
def batch():
    """`helpers.token_batch` for TINY's vocabulary: one fixed batch of inputs, targets and mask."""
    return token_batch(TINY.vocab_size)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "moto server did not start"
            time.sleep(0.5)
    urllib.request.urlopen(urllib.request.Request(endpoint + "/runs", method="PUT"))  # create the bucket
    try:
        yield endpoint
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def fault_marker(tmp_path_factory):
    return tmp_path_factory.mktemp("faults") / "fault-happened"


@pytest.fixture(scope="module")
def s3_env(s3_server, tmp_path_factory):
    """The AWS_* variables that point at moto's server, and an empty download cache (RWKVRAY_CACHE_DIR) of this
    process, for the module; the variables are restored after it."""
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "RWKVRAY_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="module")
def s3_ray(s3_env, fault_marker):
    """Ray started after the AWS_* variables are set (the run's controller reads the bucket too); the last worker
    of run "s3run" exits once after its step-4 report (tests/worker_hooks.py)."""
    crash = {"run": "s3run", "step": 4, "marker": str(fault_marker)}
    import ray
    ray.init(address="local", num_cpus=2, log_to_driver=False, runtime_env=worker_hooks.runtime_env(crash))
    try:
        yield
    finally:
        ray.shutdown()
