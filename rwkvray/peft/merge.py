"""`rwkvray merge`: fold a LoRA, PiSSA or DiSHA adapter into a full BlinkDL checkpoint.

The adapter is a single file (ours, or RWKV-PEFT's older `rwkv-N.pth` with, for PiSSA, its init_pissa.pth), or a
Hugging Face `peft` save_pretrained folder (ours, or today's RWKV-PEFT's `<proj_dir>-adapter/`).
Each adapted weight W becomes, computed in fp32 and stored in W's dtype (or `dtype` for every tensor):
- lora:  W + (alpha / r) B A
- pissa: W - B0 A0 + B A  (B0, A0: the initial init_lora_B, init_lora_A)
- disha: W + bone_delta(D) for a 2-dim D, W + bat_delta(W, D) for a 3-dim D
LayerNorm tensors in the adapter (`--train_parts ln`) replace the base's; every other tensor of the base is copied
as it is. The adapter's keys and shapes are checked against the base first, so a wrong file gives one line and no
output file.
"""
import os
import re

import torch

from rwkvray.model.checkpoint import parse_checkpoint, read_tensor_dict, save_checkpoint
from rwkvray.errors import UserError
from rwkvray.peft.disha import bat_delta, bone_delta

KINDS = ("lora", "pissa", "disha")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PARTS = {"lora": ("lora_A", "lora_B"), "pissa": ("lora_A", "lora_B", "init_lora_A", "init_lora_B"), "disha": ("disha",)}
_ADAPTER_KEY = re.compile(r"^(blocks\.\d+\.(?:att\.(?:receptance|key|value|output)|ffn\.(?:key|value)))\.(\w+)$")
_NORM_KEY = re.compile(r"^(?:blocks\.\d+\.(?:ln[012]|att\.ln_x)|ln_out)\.(?:weight|bias)$")
INIT_PREFIX = "model."  # RWKV-PEFT's init_pissa.pth keys: model.blocks.0.att.key.init_lora_A


def merge_adapter(kind: str | None, base_path: str, adapter_path: str, out_path: str, dtype: str | None = None,
                  lora_alpha: float | None = None, init_path: str | None = None) -> list[str]:
    """Write base + adapter to out_path; returns the merged weight keys. `kind` may be left to the adapter (a folder
    names its own; a file is told by its keys). `lora_alpha` (lora only) overrides the file's scalar `lora_alpha`
    entry and is needed for RWKV-PEFT's own LoRA files, which lack it. `init_path`: PiSSA's init_pissa.pth."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"--type: unknown adapter type {kind!r} (expected lora, pissa or disha)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r} (expected bf16 or fp32)")
    base = read_tensor_dict(base_path)
    parse_checkpoint(base, base_path)  # a plain x070 checkpoint, or one line saying why not
    kind, adapter, folder_alpha = read_adapter(kind, adapter_path, init_path)
    merged, keys = merged_weights(kind, base, adapter, adapter_path, base_path,
                                  lora_alpha if lora_alpha is not None else folder_alpha)
    if dtype is not None:
        merged = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in merged.items()}
    save_checkpoint(merged, out_path)
    return keys


def read_adapter(kind: str | None, path: str, init_path: str | None) -> tuple[str, dict, float | None]:
    """(kind, tensors under RWKV-PEFT's single-file key names, alpha a folder fixes) from a folder or a file."""
    if os.path.isdir(path):
        from rwkvray.peft.hf_folder import read_adapter_folder
        if init_path:
            raise UserError(f"--init: a save_pretrained folder needs no init file ({path})")
        folder_kind, adapter, alpha = read_adapter_folder(path)
        if kind is not None and kind != folder_kind:
            raise UserError(f"--type: {path} holds a {folder_kind} adapter, not {kind}")
        return folder_kind, adapter, alpha
    adapter = read_tensor_dict(path)
    if init_path:
        adapter.update({key.removeprefix(INIT_PREFIX): value for key, value in read_tensor_dict(init_path).items()})
    return kind or _kind_of(adapter, path), adapter, None


def _kind_of(adapter: dict, path: str) -> str:
    suffixes = {key.rpartition(".")[2] for key in adapter}
    if "disha" in suffixes:
        return "disha"
    if "lora_A" in suffixes:
        return "pissa" if "init_lora_A" in suffixes else "lora"
    raise UserError(f"{path}: holds no lora_A, disha or init_lora_A tensors: not an adapter (pass --type to say which)")


def merged_weights(kind: str, base: dict, adapter: dict, adapter_path: str, base_path: str,
                   lora_alpha: float | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """base with the adapter folded in (each tensor in its base dtype), and the merged weight keys."""
    norms = {key: tensor for key, tensor in adapter.items() if _NORM_KEY.match(key)}
    modules = _group_by_module(kind, {k: v for k, v in adapter.items() if k not in norms}, adapter_path)
    alpha = _lora_alpha(adapter, adapter_path, lora_alpha) if kind == "lora" else None
    merged = dict(base)
    for key, tensor in norms.items():
        if key not in base or base[key].shape != tensor.shape:
            raise UserError(f"{adapter_path}: '{key}' does not fit {base_path} (another model size?)")
        merged[key] = tensor.to(base[key].dtype)
    for module, parts in modules.items():
        key = f"{module}.weight"
        if key not in base:
            raise UserError(f"{adapter_path}: adapts '{module}', but {base_path} has no '{key}' (another model size?)")
        weight = base[key]
        delta = _delta(kind, weight.float(), parts, module, adapter_path, alpha)
        merged[key] = (weight.float() + delta).to(weight.dtype)
    return merged, [f"{module}.weight" for module in modules]


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
                hint = " (a PiSSA adapter needs its initial A and B: pass --init init_pissa.pth)"
                raise UserError(f"{path}: missing key '{module}.{part}'" + (hint if part.startswith("init_") else ""))
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
