"""Fullstate tuning (RWKV-PEFT's --train_type fullstate): the WKV state plus where the time-mix and channel-mix
token shifts start. It trains from flags and from a spec, its file carries RWKV-PEFT's keys, generate equals the
`rwkv` package with the three tensors mounted, the engine batches it with plain states, a blend blends its shifts,
and merge-state refuses it."""
import asyncio
import importlib.util
import os
import shlex

import pytest
import torch

from rwkvray.cli import main
from rwkvray.compat.rwkv_peft import spec_from_train_flags
from rwkvray.model.state_file import load_state, save_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.spec import spec_from_dict
from rwkvray.text.tokenizer import get_tokenizer
from tests.helpers import engine_steps, greedy_tokens

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")
PROMPT = "User: hello\n\nAssistant:"
SHIFT_KEYS = ["blocks.{}.att.time_state", "blocks.{}.att.ts_state", "blocks.{}.ffn.ts_state"]


def random_fullstate(n_layer: int, n_heads: int, n_embd: int, seed: int, scale: float = 3.0) -> TunedState:
    g = torch.Generator().manual_seed(seed)
    return TunedState(scale * torch.randn(n_layer, n_heads, 64, 64, generator=g),
                      scale * torch.randn(n_layer, n_embd, generator=g), scale * torch.randn(n_layer, n_embd, generator=g))


# ---------------------------------------------------------------- training


def trained(spec, out_path: str) -> list[float]:
    """Three steps of the worker loop's own module and engine on one batch; saves the state (deepspeed_world)."""
    from rwkvray.train.data import TokenBatcher
    from rwkvray.train.loop import WorkerContext, _build_engine, _build_module, _load_data
    rank = WorkerContext(session=None, rank=1, world_size=1, device=torch.device("cpu"))
    documents, _ = _load_data(spec)
    batch = TokenBatcher(documents, spec.data.ctx_len, seed=0).batch(0, 0, 1, 2)
    engine = _build_engine(spec, _build_module(spec, rank.device), rank)
    losses = engine_steps(engine, batch, 3)
    engine.module.methods[0].save(out_path)
    return losses


def test_fullstate_trains_all_three_tensors_from_flags_and_from_a_spec(deepspeed_world, tiny_model, tmp_path):
    pytest.importorskip("deepspeed")
    line = (f"--load_model {tiny_model} --data_file {SAMPLE} --data_type jsonl --ctx_len 16 --micro_bsz 2 "
            "--epoch_steps 3 --lr_init 0.05 --lr_final 0.05 --precision fp32 --op torch --accelerator cpu "
            "--peft none --train_type fullstate")
    from_flags = spec_from_train_flags(shlex.split(line))
    with_peft_state = spec_from_train_flags(shlex.split(line.replace("--peft none", "--peft state")))
    from_spec = spec_from_dict({"model": {"path": tiny_model}, "data": {"file": SAMPLE, "ctx_len": 16},
                                "peft": {"method": "state", "state": {"shift": True}}}, "test")
    assert from_flags.peft == with_peft_state.peft == from_spec.peft
    assert from_spec.peft.state.shift and not from_spec.peft.combine_state
    out = str(tmp_path / "rwkv-0.pth")
    losses = deepspeed_world.submit(trained, from_flags, out).result()
    assert losses[-1] < losses[0], losses
    raw = torch.load(out, weights_only=True)
    assert list(raw) == [key.format(i) for i in range(2) for key in SHIFT_KEYS]
    assert raw["blocks.0.att.ts_state"].shape == raw["blocks.1.ffn.ts_state"].shape == (128,)
    assert all(tensor.abs().max() > 0 for tensor in raw.values())  # every tensor moved off its zero start
    assert load_state(out).has_shift


def test_fullstate_with_a_weight_method_and_merge_on_is_refused_in_one_line(tiny_model):
    from rwkvray.errors import UserError
    line = f"--load_model {tiny_model} --data_file {SAMPLE} --peft lora --train_type fullstate"
    with pytest.raises(UserError) as caught:
        spec_from_train_flags(shlex.split(line))
    assert str(caught.value) == (
        "train flags: --peft: with a weight method and merge on, the state goes into the merged model file, which "
        "has no place for the token-shift starts: turn merge off (peft.merge: false, --merge 0) to write the state "
        "file beside the adapter")
    spec = spec_from_train_flags(shlex.split(line + " --merge 0"))
    assert (spec.peft.method, spec.peft.combine_state, spec.peft.state.shift) == ("lora", True, True)


# ---------------------------------------------------------------- generate against the rwkv package


def greedy_with_mounted_state(version: str, model_path: str, tuned: TunedState, prompt: list[int],
                              max_tokens: int) -> list[int]:
    """The `rwkv` package's greedy text on its plain torch path, its state list per layer [att x_prev, att kv,
    ffn x_prev] set to our three tensors (its v6 kv is [key, value], so the time_state goes in transposed, as the
    package reads a merged one). Its model module is loaded on its own: the v7 switch, read at import, must not
    change the module other tests import."""
    import rwkv
    with pytest.MonkeyPatch.context() as env:  # the package reads these switches at import and in forward
        env.setenv("RWKV_JIT_ON", "0")
        env.setenv("RWKV_CUDA_ON", "0")
        env.delenv("RWKV_DE_VERSION", raising=False)
        env.setenv("RWKV_V7_ON", "1" if version == "x070" else "0")
        spec = importlib.util.spec_from_file_location(f"rwkv_model_{version}",
                                                      os.path.join(os.path.dirname(rwkv.__file__), "model.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.RWKV(model_path.removesuffix(".pth"), strategy="cpu fp32")
        state = []
        for i in range(tuned.time_state.shape[0]):
            kv = tuned.time_state[i] if version == "x070" else tuned.time_state[i].transpose(-1, -2)
            state += [tuned.att_shift[i].clone(), kv.contiguous().clone(), tuned.ffn_shift[i].clone()]
        return greedy_tokens(model.forward, prompt, state, max_tokens)


@pytest.mark.parametrize("version", ["x070", "x060"])
def test_generate_with_a_fullstate_file_equals_the_rwkv_package(make_tiny_model, tmp_path, capsys, version):
    model_path = make_tiny_model(2, 128, version)
    tuned = random_fullstate(2, 2, 128, seed=1)
    full, plain = str(tmp_path / "full.pth"), str(tmp_path / "plain.pth")
    save_state(tuned, full)
    save_state(TunedState(tuned.time_state), plain)
    outputs = []
    for state_file in (full, plain):
        capsys.readouterr()
        assert main(["generate", "--model", model_path, "--prompt", PROMPT, "--max-tokens", "10",
                     "--temperature", "0", "--device", "cpu", "--state", state_file]) == 0
        outputs.append(capsys.readouterr().out.removesuffix("\n"))
    tokenizer = get_tokenizer()
    theirs = greedy_with_mounted_state(version, model_path, tuned, tokenizer.encode(PROMPT), 10)
    assert outputs[0] == tokenizer.decode(theirs)
    assert outputs[0] != outputs[1]  # the shift starts change the text, so dropping them could not pass


# ---------------------------------------------------------------- files: merge-state, export-state


def test_merge_state_refuses_a_fullstate_file_and_export_keeps_its_shifts(make_tiny_model, tmp_path, capsys):
    model_path = make_tiny_model(2, 128)
    full = str(tmp_path / "full.pth")
    tuned = random_fullstate(2, 2, 128, seed=2)
    save_state(tuned, full)
    capsys.readouterr()
    assert main(["merge-state", "--base", model_path, "--state", full, "--out", str(tmp_path / "m.pth")]) == 2
    assert capsys.readouterr().err == (
        f"error: {full}: holds token-shift starts (ts_state, from fullstate tuning), and a BlinkDL model file has "
        "no place for them (the rwkv package and RWKV-Runner read only blocks.{i}.att.time_state from it), so "
        "merging would drop them: use the state file itself (rwkvray generate --state, Serve's states folder)\n")
    assert not (tmp_path / "m.pth").exists()
    exported = str(tmp_path / "full.st")
    assert main(["export-state", "--state", full, "--out", exported]) == 0
    from safetensors.torch import load_file
    ai00 = load_file(exported)
    assert torch.equal(ai00["blocks.1.att.ts_state"], tuned.att_shift[1].half())
    assert torch.equal(ai00["blocks.0.ffn.ts_state"], tuned.ffn_shift[0].half())
    assert torch.equal(ai00["blocks.1.att.time_state"], tuned.time_state[1].transpose(-1, -2).half())


# ---------------------------------------------------------------- engine and the state store


def test_engine_batches_a_fullstate_row_with_a_plain_row_each_as_alone():
    from rwkvray.engine.batch_engine import BatchEngine, SamplingParams
    from rwkvray.text.generate import generate_tokens
    from tests.test_serve_units import SERVE_DIMS, serve_model
    model, tokenizer = serve_model(), get_tokenizer()
    full = random_fullstate(2, 1, 64, seed=3, scale=20.0)
    states = [full, TunedState(full.time_state), None]
    prompt = tokenizer.encode(PROMPT)
    alone = [tokenizer.decode(list(generate_tokens(model, prompt, state, 8, temperature=0.0))) for state in states]
    assert len(set(alone)) == 3 and SERVE_DIMS.n_embd == 64

    async def batched():
        engine = BatchEngine(model, tokenizer, max_batch_size=4)
        try:
            async def one(state):
                return "".join([chunk.text async for chunk in engine.generate(prompt, state, SamplingParams(8))])
            return await asyncio.gather(*(one(state) for state in states)), engine.metrics.snapshot()
        finally:
            engine.worker.shutdown()
    texts, metrics = asyncio.run(batched())
    assert texts == alone
    assert metrics["max_states_in_step"] == 3  # all three rows in one step


def test_store_uploads_and_blends_fullstates_blending_the_shifts(tmp_path):
    from rwkvray.serve.states import StateStore
    from tests.test_serve_units import SERVE_DIMS
    store = StateStore(str(tmp_path / "states"), SERVE_DIMS, "base", 2**24)
    a, b = random_fullstate(2, 1, 64, seed=4), random_fullstate(2, 1, 64, seed=5)
    for name, state in (("a", a), ("b", b)):
        save_state(state, str(tmp_path / f"{name}.pth"))
        described = store.upload(name, (tmp_path / f"{name}.pth").read_bytes())
        assert described["token_shift"] is True and described["shape"] == [2, 1, 64, 64]
    save_state(TunedState(b.time_state), str(tmp_path / "plain.pth"))
    assert store.upload("plain", (tmp_path / "plain.pth").read_bytes())["token_shift"] is False
    store.blend("mix", {"a": 0.25, "b": 0.75})
    mixed = store.fetch(store.resolve("mix"))
    for part in ("time_state", "att_shift", "ffn_shift"):
        torch.testing.assert_close(getattr(mixed, part), 0.25 * getattr(a, part) + 0.75 * getattr(b, part))
    on_disk = load_state(os.path.join(store.states_dir, "mix.pth"))
    assert torch.equal(on_disk.att_shift, mixed.att_shift) and torch.equal(on_disk.ffn_shift, mixed.ffn_shift)
    store.blend("half-plain", {"a": 0.5, "plain": 0.5})  # a plain state's shifts start at zero
    torch.testing.assert_close(store.fetch(store.resolve("half-plain")).att_shift, 0.5 * a.att_shift)
