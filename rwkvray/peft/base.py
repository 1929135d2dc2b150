"""The interface every PEFT method implements, and the module that trains one on a frozen RWKV model.

A method adds its trainable tensors (an initial state, adapter matrices) to a frozen base model,
saves them as its adapter file, and can fold them back into a full checkpoint.
"""
from collections.abc import Sequence

import torch
import torch.nn as nn

from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.model.long_context import Chunking, chunked_lm_loss
from rwkvray.model.loss import masked_lm_loss
from rwkvray.model.rwkv import RNNState, RWKV
from rwkvray.peft.train_parts import norm_tensors


class PeftMethod(nn.Module):
    name: str = ""
    file_prefix: str = "rwkv"  # epoch files are <prefix>-<epoch>.pth, as RWKV-PEFT names them

    def __init__(self, save_dtype: torch.dtype = torch.float32, trained_norms: Sequence[tuple[str, nn.Module]] = ()):
        """save_dtype: the adapter file's dtype (the training precision); trained_norms: the norms that
        `--train_parts ln` trains, saved in this method's file."""
        super().__init__()
        self.save_dtype, self.trained_norms = save_dtype, list(trained_norms)

    def initial_state(self, model: RWKV, batch: int, dtype: torch.dtype) -> RNNState | None:
        """The state every sequence starts from; None means zeros."""
        return None

    @classmethod
    def from_spec(cls, base: RWKV, peft_spec, **file_options) -> "PeftMethod":
        """The method the spec describes; `file_options` are save_dtype and trained_norms (see __init__)."""
        raise NotImplementedError

    def attach(self, base: RWKV) -> None:
        """Hook the method's tensors into the frozen base (or just move them to its device)."""
        raise NotImplementedError

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """A weight method's adapter tensors on the CPU, under RWKV-PEFT's key names, in the training precision."""
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """What the adapter file holds: the adapter, plus the LayerNorms that `--train_parts ln` trains."""
        return {**self.adapter_tensors(), **norm_tensors(self.trained_norms, self.save_dtype)}

    def save(self, path: str) -> None:
        """Write the method's adapter file (atomically)."""
        save_checkpoint(self.file_tensors(), path)


class PeftModel(nn.Module):
    """Frozen base + one method (or state plus one weight method); forward returns the masked LM loss.
    `chunking` runs sequences longer than its chunk_ctx in chunks (rwkvray/model/long_context.py)."""

    def __init__(self, base: RWKV, methods: list[PeftMethod], chunking: Chunking | None = None):
        super().__init__()
        base.requires_grad_(False)
        self.base, self.chunking = base, chunking
        self.methods = nn.ModuleList(methods)
        for method in methods:
            method.attach(base)
        for method in methods:  # the norms are swapped into the base; train them after attaching (peft freezes)
            for _, norm in method.trained_norms:
                norm.requires_grad_(True)

    def initial_state(self, batch: int) -> RNNState | None:
        dtype = self.base.emb.weight.dtype
        states = [s for s in (m.initial_state(self.base, batch, dtype) for m in self.methods) if s is not None]
        return states[0] if states else None

    def forward(self, input_ids, targets, mask):
        state = self.initial_state(input_ids.shape[0])
        if self.chunking and input_ids.shape[1] > self.chunking.chunk_ctx:
            return chunked_lm_loss(self.base, input_ids, targets, mask, state, self.chunking)
        hidden = self.base.features(input_ids, state)
        return masked_lm_loss(hidden, self.base.head, targets, mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def target_linears(base: RWKV, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(BlinkDL name, module) of each targeted Linear, layer by layer: ("blocks.0.att.key", Linear), ..."""
    names = [f"blocks.{i}.{target}" for i in range(base.dims.n_layer) for target in targets]
    return [(name, base.get_submodule(name)) for name in names]
