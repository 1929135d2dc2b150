"""Masked next-token cross-entropy over the vocab head, in token chunks.

The B*T*V logits are never held whole: each chunk's logits are recomputed in backward.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 4096


def _chunk_loss(hidden, head_weight, targets, mask):
    logits = hidden @ head_weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (float64 stays)
    return (F.cross_entropy(logits, targets, reduction="none") * mask).sum()


def masked_lm_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Summed loss over the tokens where mask is 1 (fp32). hidden [B,T,C], targets/mask [B,T]."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets, mask = targets.reshape(-1), mask.reshape(-1).float()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        part = slice(start, start + CHUNK_TOKENS)
        args = (hidden[part], head.weight, targets[part], mask[part])
        total = total + (checkpoint(_chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_loss(*args))
    return total


def masked_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean loss over the tokens where mask is 1. hidden [B,T,C], targets/mask [B,T]."""
    return masked_lm_loss_sum(hidden, head, targets, mask) / mask.float().sum().clamp(min=1)
