"""Tiny random models for tests (no weights can be downloaded), and a Ray head that tests start and stop."""
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from rwkvray.spec import spec_from_dict
from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.model.dims import ModelDimsX060, ModelDimsX070, RWKVDims
from rwkvray.model.rwkv import RWKV
from rwkvray.train.data import BINIDX_MAGIC, BINIDX_VERSION

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")
TINY = ModelDimsX070(n_layer=2, n_embd=128, head_size=64, vocab_size=300, dim_w=8, dim_a=8, dim_v=4, dim_g=16)


def random_model(dims: RWKVDims = TINY, seed: int = 0, dtype=torch.float32, op: str = "torch",
                 grad_cp: bool = False) -> RWKV:
    """Every parameter random, so every path (decay, value residual, gates, bonus) is exercised; the same seed
    gives the same weights whatever the backend and recompute. Any version: the dims say which."""
    torch.manual_seed(seed)
    return randomized(RWKV(dims, op, grad_cp), dtype)


def train_steps(model, batch, steps: int) -> list[float]:
    """A few AdamW steps of a PeftModel on one fixed batch; the losses."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def engine_steps(engine, batch, steps: int) -> list[float]:
    """Steps of a training engine (DeepSpeed's, or ours) on one fixed TokenBatcher batch; the losses."""
    losses = []
    for _ in range(steps):
        loss = engine(batch.input_ids, batch.targets, batch.mask)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def greedy_tokens(forward, prompt: list[int], state, max_tokens: int) -> list[int]:
    """Greedy tokens from `forward(tokens, state) -> (logits, state)` (the rwkv package's RWKV.forward), until
    token 0 or max_tokens."""
    logits, state = forward(prompt, state)
    tokens = []
    for _ in range(max_tokens):
        token = int(logits.argmax())
        if token == 0:
            break
        tokens.append(token)
        logits, state = forward([token], state)
    return tokens


TINY_X060 = ModelDimsX060(n_layer=2, n_embd=128, head_size=64, vocab_size=300, dim_ffn=448, dim_mix=8, dim_decay=16)


def randomized(model, dtype):
    """Norm weights near 1, RWKV-6's time_decay spread over [-7, 2], every other parameter random; in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("time_decay"):
                p.copy_(torch.linspace(-7, 2, p.shape[-1]).view_as(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
    return model.to(dtype).eval()


PEFT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
PEFT_CONFIGS = {
    "lora": {"method": "lora", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}},
    "pissa": {"method": "pissa", "pissa": {"r": 4, "svd_niter": 2}},
    "bone": {"method": "disha", "disha": {"mode": "bone", "r": 16}},
    "bat": {"method": "disha", "disha": {"mode": "bat", "r": 16}},
}


def saved_base(tmp_path_factory, model, name: str = "base.pth") -> str:
    """The model's weights as a checkpoint file in a fresh directory; its path."""
    path = str(tmp_path_factory.mktemp("base") / name)
    save_checkpoint(model.state_dict(), path)
    return path


def token_batch(vocab_size: int):
    """One fixed batch of 2 sequences of 32 tokens: inputs, targets, mask."""
    ids = torch.randint(0, vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:], torch.ones(2, 32)


def two_step_run_spec(model_path: str, peft: dict, storage_path, **data):
    """The smallest real job: 2 fp32 steps of micro-batch 2 over the bundled persona chats, on the torch kernel,
    written to `storage_path/run`."""
    return spec_from_dict({
        "model": {"path": model_path},
        "data": {"file": SAMPLE, "ctx_len": 32, **data},
        "peft": peft,
        "optim": {"lr_init": 0.01, "lr_final": 0.01},
        "trainer": {"epoch_count": 1, "epoch_steps": 2, "micro_bsz": 2, "precision": "fp32", "op": "torch"},
        "run": {"storage_path": str(storage_path), "name": "run"},
    }, "test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_ray_head(log_path, extra_args=(), env=None):
    """`ray start --head --block` with its dashboard on 127.0.0.1, stopped by its PID on exit; yields the
    dashboard's URL. `env` adds to (or replaces) this process's environment.
    Every port is a free one and the temp dir its own, so another Ray on this machine changes nothing: on Ray's
    fixed default ports (the job agent's 52365, metrics, Ray Client) the job agent ran without HTTP and every
    submit_job answered "No available agent", and a job's driver finds its head through the temp dir's
    ray_current_cluster record. (The temp dir is short: Ray's socket paths must fit in 107 bytes.)"""
    bin_dir = os.path.dirname(sys.executable)
    port, dashboard = free_port(), free_port()
    own_ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "metrics-export-port", "runtime-env-agent-port",
                                                         "ray-client-server-port")]
    ray_tmp = tempfile.mkdtemp(prefix="rwkvray-head-", dir="/tmp")
    try:
        with open(log_path, "w") as log:
            head = subprocess.Popen(
                [os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                 *own_ports, *extra_args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "RAY_TMPDIR": ray_tmp,
                     "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # else a SIGTERM waits up to 30 s for a drain
                     **(env or {})})
        try:
            yield f"http://127.0.0.1:{dashboard}"
        finally:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def rel_err(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def kernel_case(inputs, loop, rounded: int, dtype, device, seed):
    """The first `rounded` inputs in `dtype` (the rest fp32), upstream gradients, and `loop`'s float64 reference
    (outputs, then input gradients) computed from those same rounded values."""
    xs = [x.to(dtype).to(device) for x in inputs[:rounded]] + [x.float().to(device) for x in inputs[rounded:]]
    B, T, H, N = xs[0].shape
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(B, T, H, N, generator=g).to(dtype).to(device)
    ds = torch.randn(B, H, N, N, generator=g).to(device)
    ref_in = [x.double().requires_grad_() for x in xs]
    y, s = loop(*ref_in)
    grads = torch.autograd.grad((y * dy.double()).sum() + (s * ds.double()).sum(), ref_in)
    return xs, dy, ds, (y.detach(), s.detach(), *grads)


def assert_close_to_reference(outputs, reference, bound, input_names):
    for name, got, ref in zip(["y", "state"] + ["d" + n for n in input_names], outputs, reference):
        assert ref.abs().max() > 0, name
        err = rel_err(got, ref)
        assert err < bound, f"{name}: relative error {err:.2e} >= {bound}"


def assert_parallel_equals_rnn(model, idx, state):
    """The whole sequence at once and token by token give the same logits and final state (float64 models)."""
    with torch.no_grad():
        logits, final = model(idx, state)
        rnn_state, rnn_logits = state, []
        for t in range(idx.shape[1]):
            step_logits, rnn_state = model.step(idx[:, t], rnn_state)
            rnn_logits.append(step_logits)
    torch.testing.assert_close(torch.stack(rnn_logits, 1), logits, rtol=1e-9, atol=1e-9)
    for field in ("att_shift", "wkv", "ffn_shift"):
        torch.testing.assert_close(getattr(rnn_state, field), getattr(final, field), rtol=1e-9, atol=1e-9)


def write_binidx(prefix: str, docs: list[list[int]]) -> None:
    """A Megatron binidx pair `prefix.bin` + `prefix.idx` of uint16 tokens, one sequence per document."""
    arrays = [np.asarray(doc, dtype=np.uint16) for doc in docs]
    sizes = np.array([a.size for a in arrays], dtype=np.int32)
    pointers = (np.cumsum(sizes, dtype=np.int64) - sizes) * 2
    uint16_code = 8
    header = struct.pack("<9sQBQQ", BINIDX_MAGIC, BINIDX_VERSION, uint16_code, len(arrays), len(arrays) + 1)
    doc_idx = np.arange(len(arrays) + 1, dtype=np.int64)
    with open(prefix + ".bin", "wb") as f:
        f.write(b"".join(a.tobytes() for a in arrays))
    with open(prefix + ".idx", "wb") as f:
        f.write(header + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())


def spec_with(spec, **blocks: dict):
    """A copy of a frozen spec with some fields of some blocks changed: spec_with(spec, trainer={"seed": 8})."""
    return spec.model_copy(update={name: getattr(spec, name).model_copy(update=fields) for name, fields in blocks.items()})


def two_worker_spec(model_path, storage, name, stage=1):
    """The 2-worker DeepSpeed run of the Ray Train tests: 2 epochs of 6 steps, a checkpoint every 4."""
    return spec_from_dict({
        "run": {"name": name, "storage_path": str(storage), "checkpoint_every_steps": 4},
        "model": {"path": model_path},
        "data": {"file": SAMPLE, "ctx_len": 32, "loss_mask": "qa", "eval_file": SAMPLE.replace(".jsonl", "_eval.jsonl")},
        "optim": {"lr_init": 0.2, "lr_final": 0.05},
        "trainer": {"epoch_count": 2, "epoch_steps": 6, "micro_bsz": 2, "precision": "fp32", "op": "torch", "seed": 7},
        "deepspeed": {"stage": stage},
        "scaling": {"num_workers": 2},
    }, "test")


def wkv7_inputs(B, T, H, N, seed=0, dtype=torch.float64):
    """Random WKV-7 inputs in the ranges the model produces (decay clamp, unit-norm kk), and a non-zero s0."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    r, k, v = rand(B, T, H, N), rand(B, T, H, N) * 0.5, rand(B, T, H, N)
    w = -F.softplus(-2 * rand(B, T, H, N)) - 0.5
    kk = F.normalize(rand(B, T, H, N), dim=-1)
    a_gate = torch.sigmoid(rand(B, T, H, N))
    s0 = rand(B, H, N, N) * 0.3
    return [r, w, k, v, -kk, kk * a_gate, s0]


def wkv6_inputs(B, T, H, N, seed=0, dtype=torch.float64, decay_floor=-8.0, decay_ceiling=2.0):
    """Random WKV-6 inputs; w spans decays from ~1 (w=-8) to ~0 (w=2: exp(-e^2) = 6e-4), as RWKV-6 allows."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    r, k, v = rand(B, T, H, N), rand(B, T, H, N) * 0.5, rand(B, T, H, N)
    w = decay_floor + (decay_ceiling - decay_floor) * torch.rand(B, T, H, N, generator=g, dtype=dtype)
    u = rand(H, N) * 0.5
    s0 = rand(B, H, N, N) * 0.3
    return [r, w, k, v, u, s0]


def join_world_of_one() -> None:
    """A child process's start (see conftest's `deepspeed_world`): a gloo process group of that process alone."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rwkvray.train.loop import _join_single_process_group
    _join_single_process_group(torch.device("cpu"))
