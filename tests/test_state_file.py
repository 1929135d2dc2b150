import pytest
import torch
from safetensors import safe_open

from rwkvray.model.checkpoint import load_checkpoint, save_checkpoint
from rwkvray.model.dims import ModelDimsX070
from rwkvray.errors import UserError
from rwkvray.model.init import init_weights
from rwkvray.model.state_file import export_state, load_state, merge_state, save_state
from rwkvray.model.tuned_state import TunedState

DIMS = ModelDimsX070(n_layer=2, n_embd=128, head_size=64, vocab_size=1000, dim_w=32, dim_a=32, dim_v=32, dim_g=32)
KEYS = ["blocks.0.att.time_state", "blocks.1.att.time_state"]


@pytest.fixture
def state():
    return torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(0))


def test_save_load_round_trip_fp32(tmp_path, state):
    path = str(tmp_path / "state.pth")
    save_state(TunedState(state), path)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == KEYS
    assert all(t.shape == (2, 64, 64) and t.dtype == torch.float32 for t in raw.values())
    assert torch.equal(raw["blocks.1.att.time_state"], state[1])
    loaded = load_state(path, DIMS).time_state
    assert loaded.dtype == torch.float32 and torch.equal(loaded, state)


def test_save_bf16(tmp_path, state):
    path = str(tmp_path / "state.pth")
    save_state(TunedState(state), path, dtype=torch.bfloat16)
    assert torch.load(path, weights_only=True)["blocks.0.att.time_state"].dtype == torch.bfloat16
    assert torch.equal(load_state(path).time_state, state.bfloat16().float())


def test_refuses_state_of_another_model(tmp_path, state):
    path = str(tmp_path / "state.pth")
    save_state(TunedState(state), path)
    four_layers = ModelDimsX070(4, 128, 64, 1000, 32, 32, 32, 32)
    with pytest.raises(UserError) as error:
        load_state(path, four_layers).time_state
    assert str(error.value) == f"{path}: state shape [2, 2, 64, 64] (L,H,N,N) does not fit the model's [4, 2, 64, 64]"


def refusal(tmp_path, content):
    path = str(tmp_path / "bad.pth")
    torch.save(content, path)
    with pytest.raises(UserError) as error:
        load_state(path).time_state
    return str(error.value).replace(path, "PATH")


def test_refusals(tmp_path):
    layer = torch.zeros(2, 64, 64)
    missing = str(tmp_path / "none.pth")
    with pytest.raises(UserError, match=f"^{missing}: no such file$"):
        load_state(missing)
    assert refusal(tmp_path, [layer]) == "PATH: not a model checkpoint (it holds a list, expected a dict of tensors)"
    assert refusal(tmp_path, {}) == "PATH: holds no 'blocks.{i}.att.time_state' keys"
    assert refusal(tmp_path, {KEYS[0]: layer, "emb.weight": layer}) == \
        ("PATH: unexpected key 'emb.weight' (a state file holds only 'blocks.{i}.att.time_state' keys (and, from "
         "fullstate tuning, 'blocks.{i}.att.ts_state' and 'blocks.{i}.ffn.ts_state'))")
    shift = torch.zeros(128)
    assert refusal(tmp_path, {KEYS[0]: layer, KEYS[1]: layer, "blocks.0.att.ts_state": shift}) == \
        "PATH: missing key(s) 'blocks.0.ffn.ts_state', 'blocks.1.att.ts_state', 'blocks.1.ffn.ts_state'"
    assert refusal(tmp_path, {KEYS[0]: layer, "blocks.0.att.ts_state": torch.zeros(1, 128),
                              "blocks.0.ffn.ts_state": shift}) == \
        "PATH: key 'blocks.0.att.ts_state' has shape [1, 128], expected [C]"
    assert refusal(tmp_path, {"blocks.0.att.time_state": layer, "blocks.3.att.time_state": layer}) == \
        "PATH: missing key(s) 'blocks.1.att.time_state', 'blocks.2.att.time_state'"
    assert refusal(tmp_path, {KEYS[0]: torch.zeros(64, 64)}) == \
        "PATH: key 'blocks.0.att.time_state' has shape [64, 64], expected [H, N, N]"
    assert refusal(tmp_path, {KEYS[0]: torch.zeros(2, 64, 32)}) == \
        "PATH: key 'blocks.0.att.time_state' has shape [2, 64, 32], expected [H, N, N]"
    assert refusal(tmp_path, {KEYS[0]: layer, KEYS[1]: torch.zeros(4, 64, 64)}) == \
        "PATH: key 'blocks.1.att.time_state' has shape [4, 64, 64], but 'blocks.0.att.time_state' has [2, 64, 64]"
    assert refusal(tmp_path, {KEYS[0]: torch.zeros(2, 64, 64, dtype=torch.int32)}) == \
        "PATH: key 'blocks.0.att.time_state' has dtype torch.int32, expected a floating-point tensor"
    for bad in (float("nan"), float("inf")):
        broken = layer.clone()
        broken[1, 2, 3] = bad
        assert refusal(tmp_path, {KEYS[0]: layer, KEYS[1]: broken}) == \
            "PATH: key 'blocks.1.att.time_state' holds NaN or inf values"


def test_export_for_ai00(tmp_path, state):
    path, out = str(tmp_path / "state.pth"), str(tmp_path / "out" / "state.st")
    save_state(TunedState(state), path)
    export_state(path, out)
    with safe_open(out, framework="pt") as f:
        assert sorted(f.keys()) == KEYS
        assert f.metadata() == {"format": "pt"}
        exported = f.get_tensor("blocks.1.att.time_state")
    assert exported.dtype == torch.float16
    assert torch.equal(exported, state[1].transpose(-1, -2).half())
    assert not torch.equal(exported, state[1].half())


def test_export_refusals(tmp_path, state):
    path = str(tmp_path / "state.pth")
    save_state(TunedState(state), path)
    with pytest.raises(UserError, match=r"^unknown state export format 'gguf' \(supported: safetensors\)$"):
        export_state(path, str(tmp_path / "x.gguf"), fmt="gguf")
    save_state(TunedState(state * 1e5), path)
    with pytest.raises(UserError, match=r"state values reach .* beyond fp16's 65504; Ai00 needs fp16$"):
        export_state(path, str(tmp_path / "x.st"))
    assert not (tmp_path / "x.st").exists()


def test_merge_then_load_checkpoint(tmp_path, state):
    base, state_path, out = (str(tmp_path / name) for name in ("base.pth", "state.pth", "merged.pth"))
    weights = {k: v.bfloat16() for k, v in init_weights(DIMS, perturb=0.01).items()}
    save_checkpoint(weights, base)
    save_state(TunedState(state), state_path, dtype=torch.bfloat16)
    merge_state(base, state_path, out)
    raw = torch.load(out, weights_only=True)
    assert set(raw) == set(weights) | set(KEYS)
    assert raw["blocks.0.att.time_state"].dtype == torch.float32
    ckpt = load_checkpoint(out)
    assert ckpt.dims == DIMS
    assert set(ckpt.weights) == set(weights) - {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    assert all(torch.equal(ckpt.weights[k], weights[k]) for k in ckpt.weights)
    assert ckpt.time_state.dtype == torch.float32
    assert torch.equal(ckpt.time_state, state.bfloat16().float())


def test_merge_refuses_state_of_another_model(tmp_path, state):
    base, state_path = str(tmp_path / "base.pth"), str(tmp_path / "state.pth")
    save_checkpoint(init_weights(ModelDimsX070(3, 128, 64, 1000, 32, 32, 32, 32)), base)
    save_state(TunedState(state), state_path)
    with pytest.raises(UserError) as error:
        merge_state(base, state_path, str(tmp_path / "merged.pth"))
    assert str(error.value) == \
        f"{state_path}: state shape [2, 2, 64, 64] (L,H,N,N) does not fit the model's [3, 2, 64, 64]"
    assert not (tmp_path / "merged.pth").exists()
