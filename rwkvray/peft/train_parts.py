"""`--train_parts ln`: train every LayerNorm (and the GroupNorm ln_x) weight and bias beside the adapter.

This is what RWKV-PEFT's older releases did by default: a parameter trains when "ln" is part of its name, which
in RWKV-7 means ln0, ln1, ln2, att.ln_x and ln_out. The trained norms go into the adapter file under their
BlinkDL names (`blocks.0.ln1.weight`, ...), and a merge copies them over the base's.

Each norm keeps an fp32 master of its weight and bias, as the adapters do, and runs in the input's dtype.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_PART = "ln"  # the one --train_parts value rwkvray supports


class TrainedNorm(nn.Module):
    """A LayerNorm or GroupNorm whose weight and bias are trainable fp32 masters (same parameter names)."""

    def __init__(self, norm: nn.LayerNorm | nn.GroupNorm):
        super().__init__()
        self.groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else None
        self.shape = None if self.groups else norm.normalized_shape
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float().clone())
        self.bias = nn.Parameter(norm.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if self.groups:
            return F.group_norm(x, self.groups, weight, bias, self.eps)
        return F.layer_norm(x, self.shape, weight, bias, self.eps)


def is_trained_norm(name: str) -> bool:
    """RWKV-PEFT's rule: a module trains under --train_parts ln when "ln" is in its name."""
    return NORM_PART in name.rpartition(".")[2]


def train_norms(base: nn.Module) -> list[tuple[str, TrainedNorm]]:
    """Swap every norm of the base for a trainable one; returns (BlinkDL name, module) pairs."""
    names = [name for name, module in base.named_modules()
             if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and is_trained_norm(name)]
    norms = []
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = base.get_submodule(parent) if parent else base
        norm = TrainedNorm(getattr(owner, child)).to(base.emb.weight.device)
        setattr(owner, child, norm)
        norms.append((name, norm))
    return norms


def norm_tensors(norms: list[tuple[str, TrainedNorm]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trained norms under their BlinkDL keys, on the CPU, in `dtype`."""
    return {f"{name}.{part}": getattr(norm, part).detach().to("cpu", dtype, copy=True)
            for name, norm in norms for part in ("weight", "bias")}
