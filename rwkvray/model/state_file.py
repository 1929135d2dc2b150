"""State files in the RWKV-PEFT format: a torch.save dict {"blocks.{i}.att.time_state": tensor[H, N, N]}, plus,
from fullstate tuning, {"blocks.{i}.att.ts_state": tensor[C], "blocks.{i}.ffn.ts_state": tensor[C]} (RWKV-PEFT's
keys: where the time-mix and channel-mix token shifts start; see rwkvray/model/tuned_state.py).

The WKV layout is [value, key] (the S of `y = S @ r`), the same one RWKV-Runner and RWKV-PEFT's merged checkpoints
use. In memory a state is a TunedState: [L, H, N, N] fp32, and [L, C] fp32 per shift.
"""
import io
import re

import torch

from rwkvray.files.atomic import write_atomically, write_bytes_atomically
from rwkvray.model.checkpoint import (TIME_STATE_KEY, parse_checkpoint, read_tensor_dict, save_checkpoint,
                                      tensor_dict_from_bytes)
from rwkvray.model.dims import RWKVDims
from rwkvray.model.tuned_state import TunedState
from rwkvray.errors import UserError

SHIFT_KEYS = {"att_shift": "blocks.{}.att.ts_state", "ffn_shift": "blocks.{}.ffn.ts_state"}
_STATE_KEY = re.compile(r"^blocks\.(\d+)\.(att\.time_state|att\.ts_state|ffn\.ts_state)$")
_KIND = {"att.time_state": "time_state", "att.ts_state": "att_shift", "ffn.ts_state": "ffn_shift"}
_KEY_OF = {"time_state": TIME_STATE_KEY, **SHIFT_KEYS}
_FP16_MAX = torch.finfo(torch.float16).max
KEYS_WORDS = ("'blocks.{i}.att.time_state' keys (and, from fullstate tuning, 'blocks.{i}.att.ts_state' and "
              "'blocks.{i}.ffn.ts_state')")


def save_state(state: TunedState, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Write a state as the RWKV-PEFT dict, atomically; fp32 by default (bf16 is what RWKV-PEFT writes under bf16
    DeepSpeed)."""
    write_bytes_atomically(path, state_bytes(state, dtype))


def state_bytes(state: TunedState, dtype: torch.dtype = torch.float32) -> bytes:
    """The file save_state writes, as bytes (for a bucket, where a state is put whole)."""
    time_state = state.time_state
    if time_state.dim() != 4 or time_state.shape[2] != time_state.shape[3]:
        raise ValueError(f"time_state must be [L, H, N, N], got {list(time_state.shape)}")
    buffer = io.BytesIO()
    torch.save(state_tensors(state, dtype), buffer)
    return buffer.getvalue()


def state_tensors(state: TunedState, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The file's dict: per layer its time_state, then (fullstate) its att and ffn ts_state."""
    out = {}
    for i in range(state.time_state.shape[0]):
        for kind, key in _KEY_OF.items():
            tensor = getattr(state, kind)
            if tensor is not None:  # clone: torch.save of a view would write the whole storage under every key
                out[key.format(i)] = tensor[i].detach().to("cpu", dtype).contiguous().clone()
    return out


def load_state(path: str, dims: RWKVDims | None = None) -> TunedState:
    """Read an RWKV-PEFT state file, fp32; with `dims`, it must fit that model."""
    return _state_of(read_tensor_dict(path), path, dims)


def state_from_bytes(data: bytes, where: str, dims: RWKVDims | None = None) -> TunedState:
    """load_state for a state file read whole; `where` names it in the errors."""
    return _state_of(tensor_dict_from_bytes(data, where), where, dims)


def _state_of(raw: dict[str, torch.Tensor], path: str, dims: RWKVDims | None) -> TunedState:
    layers = _check_keys(raw, path)
    shape = _check_tensors(layers, path)
    if dims is not None and shape != (dims.n_layer, *dims.state_shape):
        raise UserError(f"{path}: state shape {list(shape)} (L,H,N,N) does not fit the model's "
                        f"{[dims.n_layer, *dims.state_shape]}")
    stacked = {kind: torch.stack([layer[kind].float() for layer in layers]) for kind in layers[0]}
    for kind in SHIFT_KEYS:
        if kind in stacked and dims is not None and stacked[kind].shape[1] != dims.n_embd:
            raise UserError(f"{path}: key '{SHIFT_KEYS[kind].format(0)}' has {stacked[kind].shape[1]} channels, "
                            f"the model {dims.n_embd}")
    return TunedState(**stacked)


def export_state(state_path: str, out_path: str, fmt: str = "safetensors") -> None:
    """Write a state for Ai00: safetensors, fp16, same key names, last two dims of the time_state transposed.

    That is what Ai00's own .pth -> .st converter (assets/scripts/convert_safetensors.py) does: it casts every
    tensor to fp16 and transposes the last two dims of keys containing "time_state", so Ai00 reads [key, value].
    A fullstate file's ts_state keys go along the same way (fp16, as they are).
    """
    if fmt != "safetensors":
        raise UserError(f"unknown state export format '{fmt}' (supported: safetensors)")
    state = load_state(state_path)
    tensors = [t for t in (state.time_state, state.att_shift, state.ffn_shift) if t is not None]
    peak = max(t.abs().max().item() for t in tensors)
    if peak > _FP16_MAX:
        raise UserError(f"{state_path}: state values reach {peak:.4g}, beyond fp16's {_FP16_MAX:.0f}; "
                        "Ai00 needs fp16")
    transposed = TunedState(state.time_state.transpose(-1, -2), state.att_shift, state.ffn_shift)
    out = state_tensors(transposed, torch.float16)

    from safetensors.torch import save_file
    write_atomically(out_path, lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))


def merge_state(base_path: str, state_path: str, out_path: str) -> None:
    """Write the base checkpoint plus the state's blocks.{i}.att.time_state keys (fp32) in one file.

    Like RWKV-PEFT's merge/merge_state.py: every base tensor is kept as it is and the state keys are added
    (replacing any the base already has). `load_checkpoint` returns them as `Checkpoint.time_state`.
    """
    base = read_tensor_dict(base_path)
    dims = parse_checkpoint(base, base_path).dims
    state = load_state(state_path, dims)
    if state.has_shift:
        raise UserError(f"{state_path}: holds token-shift starts (ts_state, from fullstate tuning), and a BlinkDL "
                        "model file has no place for them (the rwkv package and RWKV-Runner read only "
                        "blocks.{i}.att.time_state from it), so merging would drop them: use the state file itself "
                        "(rwkvray generate --state, Serve's states folder)")
    save_checkpoint({**base, **state_tensors(state)}, out_path)


def _check_keys(raw: dict[str, torch.Tensor], path: str) -> list[dict[str, torch.Tensor]]:
    """Per layer in order, its tensors by kind; refuse other keys, gaps in the layer numbers and ts_state keys on
    some layers only."""
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        match = _STATE_KEY.match(key)
        if not match:
            raise UserError(f"{path}: unexpected key '{key}' (a state file holds only {KEYS_WORDS})")
        by_layer.setdefault(int(match.group(1)), {})[_KIND[match.group(2)]] = tensor
    if not any("time_state" in layer for layer in by_layer.values()):
        raise UserError(f"{path}: holds no 'blocks.{{i}}.att.time_state' keys")
    shifted = any(kind in layer for layer in by_layer.values() for kind in SHIFT_KEYS)
    kinds = ["time_state", *(SHIFT_KEYS if shifted else ())]  # the shift starts come as a pair, in every layer
    missing = [_KEY_OF[kind].format(i) for i in range(max(by_layer) + 1) for kind in kinds
               if kind not in by_layer.get(i, {})]
    if missing:
        raise UserError(f"{path}: missing key(s) " + ", ".join(f"'{key}'" for key in missing))
    return [by_layer[i] for i in range(len(by_layer))]


def _check_tensors(layers: list[dict[str, torch.Tensor]], path: str) -> tuple[int, int, int, int]:
    """Every time_state [H,N,N] and ts_state [C], the same shapes in every layer, floating point and finite;
    returns (L, H, N, N)."""
    first = {kind: tuple(tensor.shape) for kind, tensor in layers[0].items()}
    for i, layer in enumerate(layers):
        for kind, tensor in layer.items():
            key, shape = _KEY_OF[kind].format(i), tuple(tensor.shape)
            if kind == "time_state" and (len(shape) != 3 or shape[1] != shape[2]):
                raise UserError(f"{path}: key '{key}' has shape {list(shape)}, expected [H, N, N]")
            if kind != "time_state" and len(shape) != 1:
                raise UserError(f"{path}: key '{key}' has shape {list(shape)}, expected [C]")
            if shape != first[kind]:
                raise UserError(f"{path}: key '{key}' has shape {list(shape)}, but "
                                f"'{_KEY_OF[kind].format(0)}' has {list(first[kind])}")
            if not tensor.is_floating_point():
                raise UserError(f"{path}: key '{key}' has dtype {tensor.dtype}, expected a floating-point tensor")
            if not torch.isfinite(tensor).all():
                raise UserError(f"{path}: key '{key}' holds NaN or inf values")
    return (len(layers), *first["time_state"])
