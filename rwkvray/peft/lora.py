"""LoRA on the block Linears, with the `peft` library's LoRA layers: W x + (alpha/r) B A dropout(x).

The adapter file is RWKV-PEFT's: `blocks.{i}.{target}.lora_A` [r, in] and `.lora_B` [out, r], plus a scalar
`lora_alpha` so that `rwkvray merge` needs no flag for it (RWKV-PEFT's own merge skips that key). The file is in the
training precision, as RWKV-PEFT's are; the optimizer keeps fp32 masters.
"""
import torch
import torch.nn as nn

from rwkvray.errors import UserError
from rwkvray.model.rwkv import RWKV
from rwkvray.peft.base import PeftMethod, target_linears

ADAPTER = "default"  # peft's name for the one adapter each layer carries


def inject_lora(base: RWKV, targets: list[str], **lora_config) -> list[tuple[str, nn.Module]]:
    """Wrap each target Linear in a peft LoRA layer; returns (BlinkDL name, layer) pairs.

    peft gives the adapters the base's dtype; they are made fp32 here so that the optimizer keeps fp32 masters
    (the state method does the same), and peft casts the input to them.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ModuleNotFoundError:
        raise UserError("peft.method: lora and pissa need the peft package, which is not installed "
                        "(pip install 'rwkvray[peft]')") from None
    names = [name for name, _ in target_linears(base, targets)]
    inject_adapter_in_model(LoraConfig(target_modules=names, bias="none", **lora_config), base)
    layers = [(name, base.get_submodule(name)) for name in names]
    for _, layer in layers:
        layer.lora_A[ADAPTER].float()
        layer.lora_B[ADAPTER].float()
    return layers


def lora_tensors(layers: list[tuple[str, nn.Module]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A copy of every layer's A and B on the CPU, in `dtype`, under RWKV-PEFT's key names."""
    tensors = {}
    for name, layer in layers:
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[ADAPTER].weight
            tensors[f"{name}.{part}"] = weight.detach().to("cpu", dtype, copy=True)
    return tensors


class LoRA(PeftMethod):
    name = "lora"
    file_prefix = "lora"

    def __init__(self, r: int, alpha: float, dropout: float, targets: list[str], **file_options):
        super().__init__(**file_options)
        self.r, self.alpha, self.dropout, self.targets = r, alpha, dropout, list(targets)
        self.layers: list[tuple[str, nn.Module]] = []  # the layers live in the base, so they are not submodules

    @classmethod
    def from_spec(cls, base: RWKV, peft_spec, **file_options) -> "LoRA":
        config = peft_spec.lora
        return cls(config.r, config.alpha, config.dropout, config.targets, **file_options)

    def attach(self, base: RWKV) -> None:
        self.layers = inject_lora(base, self.targets, r=self.r, lora_alpha=self.alpha,
                                  lora_dropout=self.dropout, init_lora_weights=True)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {**lora_tensors(self.layers, self.save_dtype), "lora_alpha": torch.tensor(float(self.alpha))}
