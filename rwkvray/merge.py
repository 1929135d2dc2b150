"""`rwkvray merge`: fold a LoRA, PiSSA or DiSHA adapter file into a full BlinkDL checkpoint.

Each adapted weight W becomes, computed in fp32 and stored in W's dtype (or `dtype` for every tensor):
- lora:  W + (alpha / r) B A
- pissa: W - B0 A0 + B A  (B0, A0: the initial init_lora_B, init_lora_A the file carries)
- disha: W + bone_delta(D) for a 2-dim D, W + bat_delta(W, D) for a 3-dim D
Every other tensor of the base is copied as it is. The adapter's keys and shapes are checked against the base
first, so a wrong file gives one line and no output file.
"""
import re

import torch

from rwkvray.checkpoint import parse_checkpoint, read_tensor_dict, save_checkpoint
from rwkvray.errors import UserError
from rwkvray.peft.disha import bat_delta, bone_delta

KINDS = ("lora", "pissa", "disha")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PARTS = {"lora": ("lora_A", "lora_B"), "pissa": ("lora_A", "lora_B", "init_lora_A", "init_lora_B"), "disha": ("disha",)}
_ADAPTER_KEY = re.compile(r"^(blocks\.\d+\.(?:att\.(?:receptance|key|value|output)|ffn\.(?:key|value)))\.(\w+)$")


def merge_adapter(kind: str, base_path: str, adapter_path: str, out_path: str, dtype: str | None = None,
                  lora_alpha: float | None = None) -> list[str]:
    """Write base + adapter to out_path; returns the merged weight keys. `lora_alpha` (lora only) overrides the
    file's scalar `lora_alpha` entry and is needed for RWKV-PEFT's own LoRA files, which lack it."""
    if kind not in KINDS:
        raise UserError(f"--type: unknown adapter type {kind!r} (expected lora, pissa or disha)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r} (expected bf16 or fp32)")
    base = read_tensor_dict(base_path)
    parse_checkpoint(base, base_path)  # a plain x070 checkpoint, or one line saying why not
    adapter = read_tensor_dict(adapter_path)
    modules = _group_by_module(kind, adapter, adapter_path)
    alpha = _lora_alpha(adapter, adapter_path, lora_alpha) if kind == "lora" else None

    merged = dict(base)
    for module, parts in modules.items():
        key = f"{module}.weight"
        if key not in base:
            raise UserError(f"{adapter_path}: adapts '{module}', but {base_path} has no '{key}' (another model size?)")
        weight = base[key]
        delta = _delta(kind, weight.float(), parts, module, adapter_path, alpha)
        merged[key] = (weight.float() + delta).to(weight.dtype)
    if dtype is not None:
        merged = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in merged.items()}
    save_checkpoint(merged, out_path)
    return [f"{module}.weight" for module in modules]


def _group_by_module(kind: str, adapter: dict, path: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"blocks.0.att.key": {"lora_A": A, "lora_B": B}, ...}; every part of the kind present, nothing else."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.items():
        if key == "lora_alpha" and kind == "lora":
            continue
        match = _ADAPTER_KEY.match(key)
        if not match or match.group(2) not in PARTS[kind]:
            expected = ", ".join(f".{part}" for part in PARTS[kind])
            raise UserError(f"{path}: unexpected key '{key}' for a {kind} adapter (expected keys ending in {expected})")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    if not modules:
        raise UserError(f"{path}: holds no {kind} tensors")
    for module, parts in modules.items():
        for part in PARTS[kind]:
            if part not in parts:
                raise UserError(f"{path}: missing key '{module}.{part}'" + (
                    " (a PiSSA adapter must carry its initial A and B)" if part.startswith("init_") else ""))
    return modules


def _lora_alpha(adapter: dict, path: str, lora_alpha: float | None) -> float:
    """The flag's alpha, else the file's; the scale alpha / r is taken per module (r from each A)."""
    if lora_alpha is not None:
        return float(lora_alpha)
    if "lora_alpha" not in adapter:
        raise UserError(f"{path}: no 'lora_alpha' entry (RWKV-PEFT's LoRA files lack it); pass --lora-alpha")
    alpha = adapter["lora_alpha"]
    if alpha.numel() != 1:
        raise UserError(f"{path}: 'lora_alpha' must be a scalar, got shape {list(alpha.shape)}")
    return alpha.item()


def _delta(kind: str, weight: torch.Tensor, parts: dict, module: str, path: str, alpha: float | None) -> torch.Tensor:
    if kind == "disha":
        return _disha_delta(weight, parts["disha"], module, path)
    B, A = _checked_pair(parts["lora_B"], parts["lora_A"], weight.shape, f"{module}.lora", path)
    if kind == "lora":
        return (alpha / A.shape[0]) * (B @ A)
    B0, A0 = _checked_pair(parts["init_lora_B"], parts["init_lora_A"], weight.shape, f"{module}.init_lora", path)
    return B @ A - B0 @ A0


def _checked_pair(B: torch.Tensor, A: torch.Tensor, shape, prefix: str, path: str):
    """B [out, r] and A [r, in] for a weight [out, in]."""
    out_features, in_features = shape
    fits = A.dim() == 2 and B.dim() == 2 and A.shape[0] == B.shape[1]
    if not fits or A.shape[1] != in_features or B.shape[0] != out_features:
        raise UserError(f"{path}: '{prefix}_B' {list(B.shape)} and '{prefix}_A' {list(A.shape)} do not fit a "
                        f"[{out_features}, {in_features}] weight (expected [{out_features}, r] and [r, {in_features}])")
    return B, A


def _disha_delta(weight: torch.Tensor, disha: torch.Tensor, module: str, path: str) -> torch.Tensor:
    out_features, in_features = weight.shape
    if disha.dim() == 2 and disha.shape[1] == out_features and in_features % disha.shape[0] == 0:
        return bone_delta(disha, in_features)
    r = disha.shape[-1]
    if (disha.dim() == 3 and disha.shape[1] == r and out_features % r == 0
            and disha.shape[0] * r == in_features):
        return bat_delta(weight, disha)
    raise UserError(f"{path}: '{module}.disha' has shape {list(disha.shape)}, which fits neither bone "
                    f"([r, {out_features}], r dividing {in_features}) nor bat ([{in_features}/r, r, r], r dividing "
                    f"{out_features}) for a [{out_features}, {in_features}] weight")
