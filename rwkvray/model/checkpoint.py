"""Read, check and write BlinkDL-format RWKV-7 (x070) and RWKV-6 (x060) checkpoints (`.pth` state dicts).

The version comes from the keys (an `att.time_maa` key means x060, as in the rwkv package). Every dimension is
read from the tensors (see `infer_dims`); every expected key is checked for presence and shape; anything that is
not a plain x070 or x060 model (RWKV-4/5, DeepEmbed 7a/7b, stray keys) is refused with one line.
"""
import io
import os
import pickle
import re
import zipfile
from dataclasses import dataclass

import torch

from rwkvray.files.atomic import write_atomically
from rwkvray.model.checkpoint_x060 import block_shapes_x060, infer_dims_x060, is_x060
from rwkvray.model.dims import ModelDimsX070, RWKVDims
from rwkvray.errors import UserError

TIME_STATE_KEY = "blocks.{}.att.time_state"
WEIGHTS_ONLY_REFUSAL = "GLOBAL "  # torch.load(weights_only)'s words for a pickle that names a class or function
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TIME_STATE = re.compile(r"^blocks\.(\d+)\.att\.time_state$")
# Layer 0 of RWKV-LM has value-residual parameters too, but the forward pass never uses them.
_UNUSED_LAYER0 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
# Key fragments of older RWKV generations, most telling first; checked only once `att.time_maa` (RWKV-6) is absent.
_OLDER_GENERATIONS = (
    ("att.time_faaaa", "RWKV-5"),
    ("att.time_first", "RWKV-4"),
    ("att.time_decay", "RWKV-5 or older"),
    ("att.time_mix_", "RWKV-5 or older"),
)
# Per-block keys of the DeepEmbed variants (RWKV-7a/7b).
_DEEP_EMBED = {"ffn.s_emb.weight", "ffn.s_emb_x.weight", "ffn.s0", "ffn.s1", "ffn.s2",
               "att.k_emb.weight", "att.v_emb.weight"}


@dataclass
class Checkpoint:
    dims: RWKVDims  # dims.version is "x070" or "x060"
    weights: dict[str, torch.Tensor]  # model weights only (time_state and unused blocks.0.att.v* removed)
    time_state: torch.Tensor | None  # [L,H,N,N] fp32 if the file carries merged blocks.{i}.att.time_state keys


def load_checkpoint(path: str) -> Checkpoint:
    """Load a BlinkDL x070 or x060 checkpoint of any size (memory-mapped where the file format allows it)."""
    return parse_checkpoint(read_tensor_dict(path), path)


def read_tensor_dict(path: str) -> dict[str, torch.Tensor]:
    """torch.load a file that must hold a dict of str -> tensor; refuse anything else with one line."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    # mmap needs the zip format of torch.save; files written by torch < 1.6 are read into memory.
    return _load_tensor_dict(path, path, mmap=zipfile.is_zipfile(path))


def tensor_dict_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """read_tensor_dict for a file already read whole (a state from a bucket or an upload); `where` names it."""
    return _load_tensor_dict(io.BytesIO(data), where, mmap=False)


def _load_tensor_dict(source, where: str, mmap: bool) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if WEIGHTS_ONLY_REFUSAL in str(err):  # a pickle of Python objects: loading it could run code
            raise UserError(f"{where}: holds objects other than tensors; it was not loaded") from None
        raise UserError(f"{where}: not a PyTorch checkpoint (torch.load cannot read it)") from None
    except Exception:
        raise UserError(f"{where}: not a PyTorch checkpoint (torch.load cannot read it)") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{where}: not a model checkpoint (it holds a {type(loaded).__name__}, "
                        "expected a dict of tensors)")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: not a model checkpoint (entry {key!r} is a {type(value).__name__}, "
                            "expected a tensor)")
    return loaded


def parse_checkpoint(raw: dict[str, torch.Tensor], path: str) -> Checkpoint:
    """Check a loaded state dict against the x070 or x060 layout and split off merged time_state keys."""
    try:
        if not is_x060(raw):
            _refuse_other_architectures(raw)
        dims = infer_dims(raw)
        state_keys = {key for key in raw if _TIME_STATE.match(key)}
        weights = {k: v for k, v in raw.items() if k not in state_keys and k not in _UNUSED_LAYER0}
        check_weights(weights, dims)
        time_state = _stack_time_state(raw, state_keys, dims) if state_keys else None
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    return Checkpoint(dims=dims, weights=weights, time_state=time_state)


def infer_dims(weights: dict) -> RWKVDims:
    """Read every dimension from the tensors (for x060 see `infer_dims_x060`).

    x070: H, N from `blocks.0.att.r_k`; V, C from `emb.weight`; L = highest block index + 1; the low-rank dims from
    the widths of `w1`, `a1`, `g1` of block 0 and of `v1` of block 1 (layer 0 has no value residual).
    Merged `blocks.{i}.att.time_state` keys do not count as layers.
    A one-layer model has no used `v1`: then dim_v is the width of `blocks.0.att.v1` if the file has it
    (RWKV-LM writes it), else 0.
    """
    if is_x060(weights):
        return infer_dims_x060(weights, _n_layer(weights), lambda key, ndim: _shape(weights, key, ndim))
    vocab_size, n_embd = _shape_2d(weights, "emb.weight")
    n_head, head_size = _shape_2d(weights, "blocks.0.att.r_k")
    if n_head * head_size != n_embd:
        raise UserError(f"key 'blocks.0.att.r_k' has shape [{n_head}, {head_size}] but H*N must equal "
                        f"the embedding size {n_embd} of 'emb.weight'")
    n_layer = _n_layer(weights)
    if n_layer > 1:
        dim_v = _shape_2d(weights, "blocks.1.att.v1")[1]
    else:
        dim_v = _shape_2d(weights, "blocks.0.att.v1")[1] if "blocks.0.att.v1" in weights else 0
    return ModelDimsX070(
        n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab_size,
        dim_w=_shape_2d(weights, "blocks.0.att.w1")[1],
        dim_a=_shape_2d(weights, "blocks.0.att.a1")[1],
        dim_v=dim_v,
        dim_g=_shape_2d(weights, "blocks.0.att.g1")[1],
    )


def expected_shapes(dims: RWKVDims) -> dict[str, tuple[int, ...]]:
    """Every model key of an x070 (or x060) checkpoint with its shape, in RWKV-LM's state-dict order.

    Layer 0 has no v0/v1/v2 here: they are never used (init_weights adds them, as RWKV-LM writes them).
    """
    C, V = dims.n_embd, dims.vocab_size
    block_shapes = block_shapes_x060 if dims.version == "x060" else _block_shapes
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(dims.n_layer):
        shapes.update(block_shapes(i, dims))
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def check_weights(weights: dict[str, torch.Tensor], dims: RWKVDims) -> None:
    """Every expected key present with its shape and a floating dtype, and no other key."""
    expected = expected_shapes(dims)
    for key, shape in expected.items():
        if key not in weights:
            raise UserError(f"missing key '{key}'")
        tensor = weights[key]
        if tuple(tensor.shape) != shape:
            raise UserError(f"key '{key}' has shape {list(tensor.shape)}, expected {list(shape)}")
        if not tensor.is_floating_point():
            raise UserError(f"key '{key}' has dtype {tensor.dtype}, expected a floating-point tensor")
    for key in weights:
        if key not in expected:
            generation = "RWKV-6 x060" if dims.version == "x060" else "RWKV-7 x070"
            raise UserError(f"unexpected key '{key}' (not part of an {generation} checkpoint)")


def save_checkpoint(weights: dict, path: str) -> None:
    """torch.save a dict of tensors atomically (temp file in the same folder, then os.replace). Saved through a
    file object, the archive's inner folder is "archive", not the temp file's random name: the same weights give
    the same bytes."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(weights, f)

    write_atomically(path, write)


def _block_shapes(i: int, dims: ModelDimsX070) -> dict[str, tuple[int, ...]]:
    C, H, N = dims.n_embd, dims.n_head, dims.head_size
    vec = (1, 1, C)
    b, att = f"blocks.{i}.", f"blocks.{i}.att."
    shapes = {b + "ln1.weight": (C,), b + "ln1.bias": (C,), b + "ln2.weight": (C,), b + "ln2.bias": (C,)}
    if i == 0:
        shapes.update({b + "ln0.weight": (C,), b + "ln0.bias": (C,)})
    for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
        shapes[att + name] = vec
    shapes.update({att + "w1": (C, dims.dim_w), att + "w2": (dims.dim_w, C), att + "w0": vec,
                   att + "a1": (C, dims.dim_a), att + "a2": (dims.dim_a, C), att + "a0": vec})
    if i > 0:
        shapes.update({att + "v1": (C, dims.dim_v), att + "v2": (dims.dim_v, C), att + "v0": vec})
    shapes.update({att + "g1": (C, dims.dim_g), att + "g2": (dims.dim_g, C),
                   att + "k_k": vec, att + "k_a": vec, att + "r_k": (H, N)})
    for name in ("receptance", "key", "value", "output"):
        shapes[f"{att}{name}.weight"] = (C, C)
    shapes.update({att + "ln_x.weight": (C,), att + "ln_x.bias": (C,),
                   b + "ffn.x_k": vec, b + "ffn.key.weight": (4 * C, C), b + "ffn.value.weight": (C, 4 * C)})
    return shapes


def _refuse_other_architectures(weights: dict) -> None:
    for fragment, generation in _OLDER_GENERATIONS:
        key = next((key for key in weights if fragment in key), None)
        if key:
            raise UserError(f"looks like an {generation} checkpoint (key '{key}'); "
                            "rwkvray needs an RWKV-7 (x070) or RWKV-6 (x060) model")
    for key in weights:
        block = _BLOCK_KEY.match(key)
        if block and block.group(2) in _DEEP_EMBED:
            raise UserError(f"key '{key}' belongs to RWKV-7 DeepEmbed (7a/7b), which rwkvray does not support; "
                            "use a plain RWKV-7 (x070) model")


def _n_layer(weights: dict) -> int:
    """Highest block index + 1; merged time_state keys do not count."""
    layers = [int(m.group(1)) for key in weights if (m := _BLOCK_KEY.match(key)) and not _TIME_STATE.match(key)]
    if not layers:
        raise UserError("no 'blocks.{i}.' keys: not an RWKV model")
    return 1 + max(layers)


def _shape(weights: dict, key: str, ndim: int) -> tuple[int, ...]:
    if key not in weights:
        raise UserError(f"missing key '{key}'")
    shape = tuple(weights[key].shape)
    if len(shape) != ndim:
        raise UserError(f"key '{key}' has shape {list(shape)}, expected {ndim} dims")
    return shape


def _shape_2d(weights: dict, key: str) -> tuple[int, int]:
    return _shape(weights, key, 2)


def _stack_time_state(raw: dict, state_keys: set[str], dims: RWKVDims) -> torch.Tensor:
    layers = []
    for i in range(dims.n_layer):
        key = TIME_STATE_KEY.format(i)
        if key not in raw:
            raise UserError(f"missing key '{key}' (the file has time_state keys for some layers only)")
        tensor = raw[key]
        if tuple(tensor.shape) != dims.state_shape:
            raise UserError(f"key '{key}' has shape {list(tensor.shape)}, expected {list(dims.state_shape)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise UserError(f"key '{key}' holds non-finite or non-float values")
        layers.append(tensor.float())
    extra = state_keys - {TIME_STATE_KEY.format(i) for i in range(dims.n_layer)}
    if extra:
        raise UserError(f"unexpected key '{sorted(extra)[0]}' (the model has {dims.n_layer} layers)")
    return torch.stack(layers)
