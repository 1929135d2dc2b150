"""The peer server for `serve_bench.py --peer rwkvserve`: rwkvserve 0.1.0 (PyPI) in a venv of its own, the
benchmark checkpoint converted to its model folder, and its server started and stopped on loopback.

rwkvserve's loader (rwkvserve/models/auto_model.py and configuration.py in its wheel) reads a folder holding
`config.json` (n_layer, n_embd, vocab_size, head_size_a and the three low-rank sizes), `model.pth` with
BlinkDL's key names, and the tokenizer's `rwkv_vocab_v20230424.txt`. It loads with strict=False, so a key it
does not know is skipped silently: `convert_checkpoint` checks every shape itself instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import torch

PEER = "rwkvserve"
PEER_VERSION = "0.1.0"
VOCAB_FILE = "rwkv_vocab_v20230424.txt"
# rwkvserve 0.1.0's /v1/completions hands its engine `max_new_tokens`, which reads `max_tokens` (default 100)
PEER_REPLY_TOKENS = 100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peer_venv() -> str:
    """rwkvserve's own venv in rwkvray's cache (made once): torch is the CPU build on disk, the rest is pinned
    by our constraints file where it names a package."""
    from rwkvray.files.cache import cache_dir
    venv = os.path.join(cache_dir(), "peers", f"{PEER}-{PEER_VERSION}")
    if os.path.exists(os.path.join(venv, "bin", PEER)):
        return venv
    print(f"installing {PEER}=={PEER_VERSION} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "-c", os.path.join(ROOT, "constraints.txt"),
                    "torch==2.13.0", f"{PEER}=={PEER_VERSION}"], check=True)
    return venv


def convert_checkpoint(model_path: str, venv: str, folder: str) -> str:
    """Our RWKV-7 checkpoint as an rwkvserve model folder; returns the folder."""
    from rwkvray.model.checkpoint import expected_shapes, load_checkpoint
    checkpoint = load_checkpoint(model_path)
    dims = checkpoint.dims
    if dims.version != "x070":
        raise SystemExit(f"{PEER} serves RWKV-7 only; the benchmark model is {dims.version}")
    if dims.dim_w != dims.dim_a:
        raise SystemExit(f"{PEER} takes one size for the decay and a LoRAs; this model has {dims.dim_w} and "
                         f"{dims.dim_a}")
    shapes = expected_shapes(dims)
    wrong = [key for key, shape in shapes.items() if tuple(checkpoint.weights[key].shape) != shape]
    if wrong or set(checkpoint.weights) != set(shapes):
        raise SystemExit(f"the benchmark checkpoint does not have BlinkDL's x070 keys and shapes: {wrong[:3]}")
    os.makedirs(folder, exist_ok=True)
    config = {"model_type": "rwkv7", "architectures": ["RWKV7Model"], "n_layer": dims.n_layer,
              "n_embd": dims.n_embd, "vocab_size": dims.vocab_size, "head_size_a": dims.head_size,
              "dim_att_lora": dims.dim_w, "dim_gate_lora": dims.dim_g, "dim_mv_lora": dims.dim_v,
              "eos_token_id": 0}  # the RWKV World tokenizer's end of text, as in rwkvray
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    torch.save({key: tensor.float().contiguous() for key, tensor in checkpoint.weights.items()},
               os.path.join(folder, "model.pth"))
    shutil.copy(peer_vocab(venv), os.path.join(folder, VOCAB_FILE))
    return folder


def peer_vocab(venv: str) -> str:
    """The vocab file shipped inside rwkvserve's wheel (the same RWKV World vocabulary as ours)."""
    found = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                            "import os, rwkvserve; print(os.path.dirname(rwkvserve.__file__))"],
                           check=True, capture_output=True, text=True).stdout.strip()
    return os.path.join(found, "data", "tokenizers", "vocab", VOCAB_FILE)


class PeerServer:
    """`rwkvserve` as the issue measured it: CPU, fp32, continuous batching up to `max_batch_size`; one process
    with torch's default threads."""

    def __init__(self, venv: str, model_folder: str, port: int, max_batch_size: int, log_path: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        command = [os.path.join(venv, "bin", PEER), "--model-path", model_folder, "--model-name", "bench",
                   "--device", "cpu", "--dtype", "fp32", "--max-batch-size", str(max_batch_size),
                   "--host", "127.0.0.1", "--port", str(port)]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{PEER} exited with {self.process.returncode}; its log: {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{PEER} did not answer /health in {timeout_s:.0f} s; its log: {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
