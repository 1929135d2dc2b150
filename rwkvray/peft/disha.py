"""DiSHA (dimension-sharding adaptation) in RWKV-PEFT's two modes, one trainable `disha` tensor per target:

- bone: D [r, out]. The input is cut into in/r groups of r channels, and y = W x + (sum of the groups) @ D;
  that is W + D^T repeated in/r times along the input dim.
- bat: D [in/r, r, r]. W is cut into r x r blocks W_ij and each becomes W_ij + W_ij D_j + D_j
  (the update depends on W, so the frozen weight itself is needed: dequantized on a quantized base).

D starts at zero, so the model starts as the base. Written here rather than with peft's MiSS: MiSS matches bone
but its bat indexes D by output block ([out/r, r, r]), so its adapters would not merge like RWKV-PEFT's.
Adapter file: `blocks.{i}.{target}.disha` in the training precision (RWKV-PEFT's name and dtype: its older bat merge
script needs D in the base's dtype); the mode follows from the tensor's rank.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvray.errors import UserError
from rwkvray.model.rwkv import RWKV
from rwkvray.model.modules import replace_module
from rwkvray.peft.base import PeftMethod, target_linears
from rwkvray.model.quant import frozen_weight


def bone_delta(disha: torch.Tensor, in_features: int) -> torch.Tensor:
    """Bone's weight update [out, in]: column g*r + j of the update is row j of D."""
    return disha.t().repeat(1, in_features // disha.shape[0])


def bat_delta(weight: torch.Tensor, disha: torch.Tensor) -> torch.Tensor:
    """Bat's weight update [out, in] for the r x r blocks W_ij of `weight`: W_ij D_j + D_j."""
    r = disha.shape[-1]
    blocks = weight.unflatten(0, (-1, r)).unflatten(2, (-1, r)).transpose(1, 2)  # [out/r, in/r, r, r]
    return (blocks @ disha + disha).transpose(1, 2).reshape(weight.shape)


class DishaLinear(nn.Module):
    """A frozen Linear (plain or bitsandbytes, kept as `base_layer`) plus its DiSHA update."""

    def __init__(self, base_layer: nn.Module, mode: str, r: int):
        super().__init__()
        self.base_layer, self.mode, self.r = base_layer, mode, r
        out_features, in_features = base_layer.out_features, base_layer.in_features
        shape = (r, out_features) if mode == "bone" else (in_features // r, r, r)
        # fp32 master whatever the base dtype; the forward runs in the input's dtype
        self.disha = nn.Parameter(torch.zeros(shape, device=base_layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        disha = self.disha.to(x.dtype)
        if self.mode == "bone":
            return self.base_layer(x) + x.unflatten(-1, (-1, self.r)).sum(-2) @ disha
        weight = frozen_weight(self.base_layer).to(x.dtype)
        return F.linear(x, weight + bat_delta(weight, disha))


class Disha(PeftMethod):
    name = "disha"
    file_prefix = "disha"

    def __init__(self, mode: str, r: int, targets: list[str], **file_options):
        super().__init__(**file_options)
        self.mode, self.r, self.targets = mode, r, list(targets)
        self.layers: list[tuple[str, DishaLinear]] = []  # the layers live in the base, so they are not submodules

    @classmethod
    def from_spec(cls, base: RWKV, peft_spec, **file_options) -> "Disha":
        config = peft_spec.disha
        check_disha(config.mode, config.r, target_linears(base, config.targets))
        return cls(config.mode, config.r, config.targets, **file_options)

    def attach(self, base: RWKV) -> None:
        for name, linear in target_linears(base, self.targets):
            layer = DishaLinear(linear, self.mode, self.r)
            replace_module(base, name, layer)
            self.layers.append((name, layer))

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.disha": layer.disha.detach().to("cpu", self.save_dtype, copy=True)
                for name, layer in self.layers}


def check_disha(mode: str, r: int, linears: list[tuple[str, nn.Module]]) -> None:
    """bone needs r to divide each input size; bat cuts W into r x r blocks, so both sizes.
    (The spec's validation already refuses an unknown mode and r <= 0.)"""
    for name, linear in linears:
        sizes = [("input", linear.in_features)] + ([("output", linear.out_features)] if mode == "bat" else [])
        for side, size in sizes:
            if size % r:
                raise UserError(f"peft.disha.r: {mode} needs r to divide every target's {side} size, "
                                f"but r={r} does not divide {size} ({name})")
