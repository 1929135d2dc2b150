import math
import os

import pytest
import torch

from rwkvray.model.checkpoint import load_checkpoint, save_checkpoint
from rwkvray.model.dims import ModelDimsX070
from rwkvray.errors import UserError
from rwkvray.model.init import default_dims, init_weights

# Distinct low-rank dims so that mixing up w/a/v/g when inferring them cannot go unnoticed.
DIMS = ModelDimsX070(n_layer=2, n_embd=128, head_size=64, vocab_size=1000, dim_w=32, dim_a=48, dim_v=16, dim_g=64)
LAYER0_VALUES = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}


@pytest.fixture(scope="module")
def weights():
    return init_weights(DIMS, seed=1)


def block_table(i, C, H, N, dw, da, dv, dg):
    """The facts-file table for one block, written out independently of rwkvray.model.checkpoint."""
    b = f"blocks.{i}."
    table = {b + "ln1.weight": [C], b + "ln1.bias": [C], b + "ln2.weight": [C], b + "ln2.bias": [C],
             b + "att.w1": [C, dw], b + "att.w2": [dw, C], b + "att.a1": [C, da], b + "att.a2": [da, C],
             b + "att.v1": [C, dv], b + "att.v2": [dv, C], b + "att.g1": [C, dg], b + "att.g2": [dg, C],
             b + "att.r_k": [H, N], b + "att.ln_x.weight": [C], b + "att.ln_x.bias": [C],
             b + "ffn.x_k": [1, 1, C], b + "ffn.key.weight": [4 * C, C], b + "ffn.value.weight": [C, 4 * C]}
    for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
        table[b + "att." + name] = [1, 1, C]
    for name in ("receptance", "key", "value", "output"):
        table[b + f"att.{name}.weight"] = [C, C]
    if i == 0:
        table.update({b + "ln0.weight": [C], b + "ln0.bias": [C]})
    return table


def test_default_dims_match_released_models():
    small, large = default_dims(12, 768), default_dims(24, 2048)
    assert (small.dim_w, small.dim_a, small.dim_v, small.dim_g) == (64, 64, 32, 128)
    assert (large.dim_w, large.dim_a, large.dim_v, large.dim_g) == (96, 96, 64, 256)
    assert small.vocab_size == 65536 and small.head_size == 64 and small.n_head == 12


def test_default_dims_refuses_bad_head_size():
    with pytest.raises(UserError, match=r"^n_embd 100 is not a multiple of the head size 64$"):
        default_dims(2, 100)


def test_init_weights_has_every_key_with_its_shape(weights):
    table = {"emb.weight": [1000, 128], "head.weight": [1000, 128], "ln_out.weight": [128], "ln_out.bias": [128]}
    for i in range(2):
        table.update(block_table(i, C=128, H=2, N=64, dw=32, da=48, dv=16, dg=64))
    assert {key: list(t.shape) for key, t in weights.items()} == table
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_init_weights_exact_values(weights):
    C = 128
    ddd = torch.arange(C, dtype=torch.float64) / C
    n = torch.arange(C, dtype=torch.float64)
    z = ((n % 64) - 31.5) / 31.5
    assert torch.allclose(weights["blocks.0.att.x_r"].view(-1).double(), 1 - ddd ** 0.2, atol=1e-6)
    assert torch.allclose(weights["blocks.1.att.x_w"].view(-1).double(), 1 - ddd ** (0.9 * 0.5), atol=1e-6)
    assert torch.allclose(weights["blocks.1.ffn.x_k"].view(-1).double(), 1 - ddd ** (0.5 ** 4), atol=1e-6)
    w0_layer1 = -6 + 6 * (n / (C - 1)) ** 2 + 0.5 + 2.5 * z * z.abs()
    assert torch.allclose(weights["blocks.1.att.w0"].view(-1).double(), w0_layer1, atol=1e-5)
    assert torch.allclose(weights["blocks.0.att.a0"].view(-1).double(),
                          -0.19 + 0.3 * z * z.abs() + 0.4 * (n / (C - 1) - 0.5), atol=1e-6)
    assert torch.all(weights["blocks.1.att.k_a"] == torch.tensor(1.02))
    assert torch.all(weights["blocks.0.att.r_k"] == torch.tensor(-0.04))
    assert torch.allclose(weights["blocks.0.att.ln_x.weight"], torch.full((C,), 0.5 ** 0.7))
    assert torch.all(weights["blocks.1.att.ln_x.weight"] == 1.0)
    assert torch.all(weights["blocks.0.ln0.weight"] == 1.0) and torch.all(weights["ln_out.bias"] == 0.0)
    for zero in ("blocks.1.att.output.weight", "blocks.0.ffn.value.weight", "blocks.1.att.w1", "blocks.0.att.g1"):
        assert torch.all(weights[zero] == 0.0), zero
    assert weights["emb.weight"].abs().max() <= 1e-4 and weights["emb.weight"].std() > 3e-5


def test_init_weights_orthogonal_gains(weights):
    def gram(key):
        w = weights[key].double()
        return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w

    eye = torch.eye(128, dtype=torch.float64)
    assert torch.allclose(gram("blocks.0.att.receptance.weight"), eye, atol=1e-5)
    assert torch.allclose(gram("blocks.1.att.key.weight"), 0.01 * eye, atol=1e-6)
    assert torch.allclose(gram("blocks.0.ffn.key.weight"), eye, atol=1e-5)
    assert torch.allclose(gram("head.weight"), 0.25 * (1000 / 128) * eye, atol=1e-4)
    assert torch.allclose(gram("blocks.1.att.a2"), 0.01 * torch.eye(48, dtype=torch.float64), atol=1e-6)


def test_init_weights_seed_dtype_and_perturb(weights):
    assert torch.equal(init_weights(DIMS, seed=1)["head.weight"], weights["head.weight"])
    assert not torch.equal(init_weights(DIMS, seed=2)["head.weight"], weights["head.weight"])
    assert init_weights(DIMS, seed=1, dtype=torch.bfloat16)["blocks.0.att.x_r"].dtype == torch.bfloat16
    perturbed = init_weights(DIMS, seed=1, perturb=0.02)
    for key in ("blocks.1.att.output.weight", "blocks.0.ffn.value.weight", "blocks.1.att.v1", "blocks.0.att.w1"):
        assert abs(perturbed[key].std().item() - 0.02) < 0.002, key
    assert torch.equal(perturbed["blocks.1.att.receptance.weight"], weights["blocks.1.att.receptance.weight"])
    assert torch.equal(perturbed["blocks.0.att.w0"], weights["blocks.0.att.w0"])


def test_save_and_load_infers_every_dim(tmp_path, weights):
    path = str(tmp_path / "model.pth")
    save_checkpoint(weights, path)
    ckpt = load_checkpoint(path)
    assert ckpt.dims == DIMS
    assert ckpt.time_state is None
    assert set(ckpt.weights) == set(weights) - LAYER0_VALUES
    assert all(torch.equal(ckpt.weights[key], weights[key]) for key in ckpt.weights)
    assert os.listdir(tmp_path) == ["model.pth"]


def test_loads_without_layer0_values_and_in_legacy_format(tmp_path, weights):
    path = str(tmp_path / "model.pth")
    slim = {k: v.to(torch.bfloat16) for k, v in weights.items() if k not in LAYER0_VALUES}
    torch.save(slim, path, _use_new_zipfile_serialization=False)
    ckpt = load_checkpoint(path)
    assert ckpt.dims == DIMS
    assert ckpt.weights["blocks.1.att.v1"].dtype == torch.bfloat16


def test_default_vocab_one_layer_model(tmp_path):
    dims = default_dims(1, 64)
    weights = init_weights(dims)
    assert weights["head.weight"].shape == (65536, 64)
    path = str(tmp_path / "one.pth")
    save_checkpoint(weights, path)
    assert load_checkpoint(path).dims == dims
    save_checkpoint({k: v for k, v in weights.items() if k not in LAYER0_VALUES}, path)
    assert load_checkpoint(path).dims.dim_v == 0


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"old")
    with pytest.raises(Exception):
        save_checkpoint({"x": lambda: 0}, str(path))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.pth"]


def refusal(tmp_path, content, write=torch.save):
    path = str(tmp_path / "bad.pth")
    write(content, path)
    with pytest.raises(UserError) as error:
        load_checkpoint(path)
    return str(error.value).replace(path, "PATH")


def write_bytes(content, path):
    with open(path, "wb") as f:
        f.write(content)


def test_refuses_missing_file_and_folder(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match=f"^{path}: no such file$"):
        load_checkpoint(path)
    with pytest.raises(UserError, match=f"^{tmp_path}: is a folder, not a checkpoint file$"):
        load_checkpoint(str(tmp_path))


def test_refuses_files_that_are_not_checkpoints(tmp_path):
    not_torch = "PATH: not a PyTorch checkpoint (torch.load cannot read it)"
    assert refusal(tmp_path, os.urandom(4096), write_bytes) == not_torch
    assert refusal(tmp_path, b"just some text\n", write_bytes) == not_torch
    assert refusal(tmp_path, [torch.zeros(2)]) == \
        "PATH: not a model checkpoint (it holds a list, expected a dict of tensors)"
    assert refusal(tmp_path, {"emb.weight": 3}) == \
        "PATH: not a model checkpoint (entry 'emb.weight' is a int, expected a tensor)"
    assert refusal(tmp_path, {"foo": torch.zeros(2)}) == "PATH: missing key 'emb.weight'"


def test_refuses_a_pickle_of_objects_without_running_it(tmp_path):
    ran = tmp_path / "ran"
    trap = {"emb.weight": torch.zeros(2), "x": Trap(str(ran))}
    assert refusal(tmp_path, trap) == "PATH: holds objects other than tensors; it was not loaded"
    assert not ran.exists()


class Trap:
    """Unpickling it would create a file: the proof that the load ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_truncated_rwkv6_is_refused_at_its_first_missing_key(tmp_path):
    rwkv6 = {"emb.weight": torch.zeros(10, 8), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 8),
             "blocks.0.att.time_decay": torch.zeros(1, 1, 8), "blocks.0.att.time_faaaa": torch.zeros(2, 4)}
    assert refusal(tmp_path, rwkv6) == "PATH: missing key 'blocks.0.att.time_maa_w2'"


def test_refuses_deep_embed(tmp_path, weights):
    deep = {**weights, "blocks.1.ffn.s_emb.weight": torch.zeros(1000, 32)}
    assert refusal(tmp_path, deep) == ("PATH: key 'blocks.1.ffn.s_emb.weight' belongs to RWKV-7 DeepEmbed (7a/7b), "
                                       "which rwkvray does not support; use a plain RWKV-7 (x070) model")


def test_refuses_unexpected_missing_and_misshaped_keys(tmp_path, weights):
    assert refusal(tmp_path, {**weights, "blocks.1.att.extra": torch.zeros(3)}) == \
        "PATH: unexpected key 'blocks.1.att.extra' (not part of an RWKV-7 x070 checkpoint)"
    assert refusal(tmp_path, {k: v for k, v in weights.items() if k != "blocks.1.att.w2"}) == \
        "PATH: missing key 'blocks.1.att.w2'"
    assert refusal(tmp_path, {**weights, "blocks.1.ffn.key.weight": torch.zeros(128, 128)}) == \
        "PATH: key 'blocks.1.ffn.key.weight' has shape [128, 128], expected [512, 128]"
    assert refusal(tmp_path, {**weights, "blocks.0.att.r_k": torch.zeros(4, 64)}) == \
        "PATH: key 'blocks.0.att.r_k' has shape [4, 64] but H*N must equal the embedding size 128 of 'emb.weight'"


def test_refuses_time_state_for_some_layers_only(tmp_path, weights):
    partial = {**weights, "blocks.0.att.time_state": torch.zeros(2, 64, 64)}
    assert refusal(tmp_path, partial) == \
        "PATH: missing key 'blocks.1.att.time_state' (the file has time_state keys for some layers only)"
    layer = torch.zeros(2, 64, 64)
    too_many = {**weights, **{f"blocks.{i}.att.time_state": layer for i in range(3)}}
    assert refusal(tmp_path, too_many) == "PATH: unexpected key 'blocks.2.att.time_state' (the model has 2 layers)"


def test_head_gain_formula_uses_vocab_over_embd():
    dims = ModelDimsX070(n_layer=1, n_embd=64, head_size=64, vocab_size=32, dim_w=32, dim_a=32, dim_v=32, dim_g=32)
    head = init_weights(dims)["head.weight"].double()
    assert torch.allclose(head @ head.T, 0.25 * torch.eye(32, dtype=torch.float64), atol=1e-6)
    assert math.isclose(init_weights(dims)["blocks.0.att.ln_x.weight"][0].item(), 1.0)
