"""RWKV-6 (x060) in the rest of the system: Serve's batching engine with two v6 states in one batch, the same
over HTTP on a real Ray Serve, and a state tuning run through Ray Train with DeepSpeed."""
import asyncio
import os
import socket

import pytest
import torch

from rwkvray.spec import spec_from_dict
from rwkvray.model.dims import ModelDimsX060
from rwkvray.text.generate import generate_tokens
from rwkvray.engine.batch_engine import BatchEngine, SamplingParams
from rwkvray.model.state_file import load_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.text.tokenizer import get_tokenizer
from tests.helpers import random_model

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")
# The real tokenizer's ids reach 65535, so prompts need the full vocab; everything else is tiny.
SERVE_DIMS = ModelDimsX060(n_layer=2, n_embd=64, head_size=64, vocab_size=65536, dim_ffn=224, dim_mix=8, dim_decay=8)
PROMPTS = ["User: hi\n\nAssistant:", "The capital of France is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_state(seed: int) -> TunedState:
    generator = torch.Generator().manual_seed(seed)
    return TunedState(20.0 * torch.randn(SERVE_DIMS.n_layer, *SERVE_DIMS.state_shape, generator=generator))


def greedy_text(model, prompt: str, time_state, max_tokens: int) -> str:
    tokenizer = get_tokenizer()
    return tokenizer.decode(list(generate_tokens(model, tokenizer.encode(prompt), time_state, max_tokens,
                                                 temperature=0.0)))


def test_serve_engine_decodes_two_v6_states_in_one_batch():
    model = random_model(SERVE_DIMS)
    rows_per_call = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: rows_per_call.append(args[0].shape[0]))
    cases = [(prompt, seed) for prompt in PROMPTS for seed in (1, 2)]
    expected = [greedy_text(model, prompt, random_state(seed), 8) for prompt, seed in cases]
    rows_per_call.clear()

    async def run():
        engine = BatchEngine(model, get_tokenizer(), max_batch_size=8, batch_wait_s=0.05)
        tokenizer = get_tokenizer()

        async def one(prompt, seed):
            chunks = [c async for c in engine.generate(tokenizer.encode(prompt), random_state(seed), SamplingParams(8))]
            return "".join(chunk.text for chunk in chunks)
        return await asyncio.gather(*(one(prompt, seed) for prompt, seed in cases))

    assert asyncio.run(run()) == expected
    assert len(set(expected)) == len(cases)  # the two states give different text, so cross-talk would show
    assert max(rows_per_call) == len(cases)  # all four rows, both states, went through the model together


@pytest.mark.ray
def test_serve_over_http_answers_two_mounted_v6_states_at_once(tmp_path):
    """A v6 base and two v6 state files on a real local Ray Serve; concurrent greedy requests over HTTP."""
    ray = pytest.importorskip("ray")
    import httpx
    from ray import serve
    from rwkvray.model.checkpoint import save_checkpoint
    from rwkvray.launch.serving import read_api_key, start_serve
    from rwkvray.serve.app import APP_NAME, build_app
    from rwkvray.model.state_file import save_state

    model = random_model(SERVE_DIMS)
    save_checkpoint(model.state_dict(), str(tmp_path / "base6.pth"))
    (tmp_path / "states").mkdir()
    for seed in (1, 2):
        save_state(random_state(seed), str(tmp_path / "states" / f"s{seed}.pth"))
    cases = [(prompt, seed) for prompt in PROMPTS for seed in (1, 2)]
    expected = [greedy_text(model, prompt, random_state(seed), 6) for prompt, seed in cases]
    os.environ["RWKVRAY_TEST_X060_KEY"] = "k6"
    config = spec_from_dict({"serve": {
        "model": str(tmp_path / "base6.pth"), "states_dir": str(tmp_path / "states"),
        "api_key_env": "RWKVRAY_TEST_X060_KEY", "max_batch_size": 8, "batch_wait_ms": 50.0, "use_gpu": False}},
        "test serve spec").serve
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # request logs: Ray's files
    port = free_port()  # after Ray is up: its processes bind ephemeral ports too
    try:
        start_serve("127.0.0.1", port)
        serve.run(build_app(config, read_api_key(config)), name=APP_NAME, route_prefix="/")

        async def ask_all():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                         headers={"Authorization": "Bearer k6"}) as client:
                replies = await asyncio.gather(*(client.post("/v1/completions", json={
                    "model": f"s{seed}", "prompt": prompt, "max_tokens": 6, "temperature": 0})
                    for prompt, seed in cases))
            return [reply.json()["choices"][0]["text"] for reply in replies]
        assert asyncio.run(ask_all()) == expected
    finally:
        serve.shutdown()
        ray.shutdown()
        del os.environ["RWKVRAY_TEST_X060_KEY"]
    assert len(set(expected)) == len(cases)


@pytest.mark.ray
def test_v6_state_tuning_through_ray_train_with_deepspeed(make_tiny_model, tmp_path):
    ray = pytest.importorskip("ray")
    from rwkvray.launch.run import run_on_ray
    spec = spec_from_dict({
        "run": {"name": "x060", "storage_path": str(tmp_path), "checkpoint_every_steps": 4},
        "model": {"path": make_tiny_model(2, 128, "x060"), "version": "x060"},
        "data": {"file": SAMPLE, "ctx_len": 32, "loss_mask": "qa"},
        "optim": {"lr_init": 0.2, "lr_final": 0.05},
        "trainer": {"epoch_count": 1, "epoch_steps": 6, "micro_bsz": 2, "precision": "fp32", "op": "torch", "seed": 7},
        "deepspeed": {"stage": 1},
        "scaling": {"num_workers": 2},
    }, "test")
    from tests import worker_hooks
    ray.init(address="local", num_cpus=2, log_to_driver=False, runtime_env=worker_hooks.runtime_env())
    try:
        result = run_on_ray(spec)
    finally:
        ray.shutdown()
    assert result.error is None
    assert result.metrics["replica_divergence"] == 0.0
    final = load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    assert final.shape == (2, 2, 64, 64) and final.abs().max() > 0
