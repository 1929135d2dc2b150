"""State files in the RWKV-PEFT format: a torch.save dict {"blocks.{i}.att.time_state": tensor[H, N, N]}.

The layout is [value, key] (the S of `y = S @ r`), the same one RWKV-Runner and RWKV-PEFT's merged checkpoints
use. In memory a whole state is one [L, H, N, N] fp32 tensor.
"""
import io
import re

import torch

from rwkvray.files.atomic import write_atomically, write_bytes_atomically
from rwkvray.model.checkpoint import (TIME_STATE_KEY, parse_checkpoint, read_tensor_dict, save_checkpoint,
                                      tensor_dict_from_bytes)
from rwkvray.model.dims import RWKVDims
from rwkvray.errors import UserError

_STATE_KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")
_FP16_MAX = torch.finfo(torch.float16).max


def save_state(time_state: torch.Tensor, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Write a [L,H,N,N] state as the RWKV-PEFT dict, atomically; fp32 by default (bf16 is what RWKV-PEFT writes
    under bf16 DeepSpeed)."""
    write_bytes_atomically(path, state_bytes(time_state, dtype))


def state_bytes(time_state: torch.Tensor, dtype: torch.dtype = torch.float32) -> bytes:
    """The file save_state writes, as bytes (for a bucket, where a state is put whole)."""
    if time_state.dim() != 4 or time_state.shape[2] != time_state.shape[3]:
        raise ValueError(f"time_state must be [L, H, N, N], got {list(time_state.shape)}")
    buffer = io.BytesIO()
    torch.save(_as_dict(time_state.detach().to("cpu", dtype)), buffer)
    return buffer.getvalue()


def load_state(path: str, dims: RWKVDims | None = None) -> torch.Tensor:
    """Read an RWKV-PEFT state file as a [L,H,N,N] fp32 tensor; with `dims`, it must fit that model."""
    return _state_of(read_tensor_dict(path), path, dims)


def state_from_bytes(data: bytes, where: str, dims: RWKVDims | None = None) -> torch.Tensor:
    """load_state for a state file read whole; `where` names it in the errors."""
    return _state_of(tensor_dict_from_bytes(data, where), where, dims)


def _state_of(raw: dict[str, torch.Tensor], path: str, dims: RWKVDims | None) -> torch.Tensor:
    layers = _check_keys(raw, path)
    shape = _check_tensors(layers, path)
    if dims is not None and shape != (dims.n_layer, *dims.state_shape):
        raise UserError(f"{path}: state shape {list(shape)} (L,H,N,N) does not fit the model's "
                        f"{[dims.n_layer, *dims.state_shape]}")
    return torch.stack([layer.float() for layer in layers])


def export_state(state_path: str, out_path: str, fmt: str = "safetensors") -> None:
    """Write a state for Ai00: safetensors, fp16, same key names, last two dims transposed.

    That is what Ai00's own .pth -> .st converter (assets/scripts/convert_safetensors.py) does: it casts every
    tensor to fp16 and transposes the last two dims of keys containing "time_state", so Ai00 reads [key, value].
    """
    if fmt != "safetensors":
        raise UserError(f"unknown state export format '{fmt}' (supported: safetensors)")
    state = load_state(state_path)
    peak = state.abs().max().item()
    if peak > _FP16_MAX:
        raise UserError(f"{state_path}: state values reach {peak:.4g}, beyond fp16's {_FP16_MAX:.0f}; "
                        "Ai00 needs fp16")
    tensors = _as_dict(state.transpose(-1, -2).to(torch.float16))

    from safetensors.torch import save_file
    write_atomically(out_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def merge_state(base_path: str, state_path: str, out_path: str) -> None:
    """Write the base checkpoint plus the state's blocks.{i}.att.time_state keys (fp32) in one file.

    Like RWKV-PEFT's merge/merge_state.py: every base tensor is kept as it is and the state keys are added
    (replacing any the base already has). `load_checkpoint` returns them as `Checkpoint.time_state`.
    """
    base = read_tensor_dict(base_path)
    dims = parse_checkpoint(base, base_path).dims
    state = load_state(state_path, dims)
    save_checkpoint({**base, **_as_dict(state)}, out_path)


def _as_dict(state: torch.Tensor) -> dict[str, torch.Tensor]:
    # clone: torch.save of a view would write the whole [L,H,N,N] storage under every key
    return {TIME_STATE_KEY.format(i): layer.contiguous().clone() for i, layer in enumerate(state)}


def _check_keys(raw: dict[str, torch.Tensor], path: str) -> list[torch.Tensor]:
    """The tensors in layer order; refuse other keys and gaps in the layer numbers."""
    by_layer = {}
    for key, tensor in raw.items():
        match = _STATE_KEY.match(key)
        if not match:
            raise UserError(f"{path}: unexpected key '{key}' (a state file holds only "
                            "'blocks.{i}.att.time_state' keys)")
        by_layer[int(match.group(1))] = tensor
    if not by_layer:
        raise UserError(f"{path}: holds no 'blocks.{{i}}.att.time_state' keys")
    missing = [TIME_STATE_KEY.format(i) for i in range(max(by_layer) + 1) if i not in by_layer]
    if missing:
        raise UserError(f"{path}: missing key(s) " + ", ".join(f"'{key}'" for key in missing))
    return [by_layer[i] for i in range(len(by_layer))]


def _check_tensors(layers: list[torch.Tensor], path: str) -> tuple[int, int, int, int]:
    """Every layer [H,N,N], the same shape, floating point and finite; returns (L, H, N, N)."""
    first = tuple(layers[0].shape)
    for i, tensor in enumerate(layers):
        key, shape = TIME_STATE_KEY.format(i), tuple(tensor.shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise UserError(f"{path}: key '{key}' has shape {list(shape)}, expected [H, N, N]")
        if shape != first:
            raise UserError(f"{path}: key '{key}' has shape {list(shape)}, but "
                            f"'{TIME_STATE_KEY.format(0)}' has {list(first)}")
        if not tensor.is_floating_point():
            raise UserError(f"{path}: key '{key}' has dtype {tensor.dtype}, expected a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{path}: key '{key}' holds NaN or inf values")
    return (len(layers), *first)
