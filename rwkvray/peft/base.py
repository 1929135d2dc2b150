"""The interface every PEFT method implements, and the module that trains one on a frozen RWKV-7.

A method adds its trainable tensors (an initial state, adapter matrices) to a frozen base model,
saves them as its adapter file, and can fold them back into a full checkpoint.
"""
import importlib
from collections.abc import Sequence

import torch
import torch.nn as nn

from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.model.loss import masked_lm_loss
from rwkvray.model.rwkv7 import RNNState, RWKV7
from rwkvray.peft.train_parts import NORM_PART, norm_tensors, train_norms

METHODS: dict[str, type["PeftMethod"]] = {}


class PeftMethod(nn.Module):
    name: str = ""
    file_prefix: str = "rwkv"  # epoch files are <prefix>-<epoch>.pth, as RWKV-PEFT names them
    trained_norms: Sequence[tuple[str, nn.Module]] = ()  # set by PeftModel on the weight method: --train_parts ln
    save_dtype: torch.dtype = torch.float32  # set by PeftModel: adapter files are in the training precision

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        METHODS[cls.name] = cls

    def initial_state(self, model: RWKV7, batch: int, dtype: torch.dtype) -> RNNState | None:
        """The state every sequence starts from; None means zeros."""
        return None

    @classmethod
    def from_spec(cls, base: RWKV7, peft_spec) -> "PeftMethod":
        raise NotImplementedError

    def attach(self, base: RWKV7) -> None:
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
    """Frozen base + one method (or state plus one weight method); forward returns the masked LM loss."""

    def __init__(self, base: RWKV7, methods: list[PeftMethod], train_parts: Sequence[str] = ()):
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        self.methods = nn.ModuleList(methods)
        for method in methods:
            method.attach(base)
            method.save_dtype = base.emb.weight.dtype
        if NORM_PART in train_parts:  # the weight method comes first; its file carries the norms
            methods[0].trained_norms = train_norms(base)

    def initial_state(self, batch: int) -> RNNState | None:
        dtype = self.base.emb.weight.dtype
        states = [s for s in (m.initial_state(self.base, batch, dtype) for m in self.methods) if s is not None]
        return states[0] if states else None

    def forward(self, input_ids, targets, mask):
        hidden = self.base.features(input_ids, self.initial_state(input_ids.shape[0]))
        return masked_lm_loss(hidden, self.base.head, targets, mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def method_classes(peft_spec) -> list[type[PeftMethod]]:
    """The spec's `method`, plus state tuning when `combine_state` is set."""
    names = [peft_spec.method] + (["state"] if peft_spec.combine_state and peft_spec.method != "state" else [])
    for name in names:  # each method lives in rwkvray/peft/<name>.py; importing it registers it
        importlib.import_module(f"rwkvray.peft.{name}")
    return [METHODS[name] for name in names]


def build_peft(base: RWKV7, peft_spec) -> PeftModel:
    methods = [cls.from_spec(base, peft_spec) for cls in method_classes(peft_spec)]
    model = PeftModel(base, methods, peft_spec.train_parts)
    if peft_spec.quant != "none":  # after the methods: PiSSA must take its SVD of the full-precision weights
        from rwkvray.model.quant import quantize_frozen_linears
        quantize_frozen_linears(base, peft_spec.quant)
    return model


def target_linears(base: RWKV7, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(BlinkDL name, module) of each targeted Linear, layer by layer: ("blocks.0.att.key", Linear), ..."""
    names = [f"blocks.{i}.{target}" for i in range(base.dims.n_layer) for target in targets]
    return [(name, base.get_submodule(name)) for name in names]
