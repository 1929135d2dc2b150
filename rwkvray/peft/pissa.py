"""PiSSA: LoRA whose B A starts as the top-r singular part of W, the frozen weight holding the residual.

peft's LoRA layers do the work (init_lora_weights="pissa_niter_N": randomized SVD with N subspace iterations).
As in RWKV-PEFT the scale is 1 (alpha = r) and there is no dropout. The frozen weight becomes W - B0 A0, so the
adapter file carries what a merge needs: the trained `lora_A`/`lora_B` and the initial `init_lora_A`/`init_lora_B`
(RWKV-PEFT's key names). RWKV-PEFT keeps the initial ones in a separate init_pissa.pth with `model.`-prefixed keys:
the epoch files write that file too (rwkvray.peft.epoch_outputs), so its merge scripts run on ours.
"""
import torch
import torch.nn as nn

from rwkvray.errors import UserError
from rwkvray.model.rwkv import RWKV
from rwkvray.peft.base import PeftMethod, target_linears
from rwkvray.peft.lora import inject_lora, lora_tensors

SVD_SEED = 0  # every rank (and a resumed run) must find the same residual: the randomized SVD gets a fixed seed


class PiSSA(PeftMethod):
    name = "pissa"
    file_prefix = "pissa"

    def __init__(self, r: int, svd_niter: int, targets: list[str], **file_options):
        super().__init__(**file_options)
        self.r, self.svd_niter, self.targets = r, svd_niter, list(targets)
        self.layers: list[tuple[str, nn.Module]] = []  # the layers live in the base, so they are not submodules
        self.init_tensors: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, base: RWKV, peft_spec, **file_options) -> "PiSSA":
        config = peft_spec.pissa
        for name, linear in target_linears(base, config.targets):
            if config.r > min(linear.out_features, linear.in_features):
                raise UserError(f"peft.pissa.r: {config.r} exceeds the rank of {name} "
                                f"([{linear.out_features}, {linear.in_features}])")
        return cls(config.r, config.svd_niter, config.targets, **file_options)

    def attach(self, base: RWKV) -> None:
        device = base.emb.weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(SVD_SEED)
            self.layers = inject_lora(base, self.targets, r=self.r, lora_alpha=self.r, lora_dropout=0.0,
                                      init_lora_weights=f"pissa_niter_{self.svd_niter}")
        self.init_tensors = {_init_key(key): value for key, value in lora_tensors(self.layers, torch.float32).items()}

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        init = {key: value.to(self.save_dtype) for key, value in self.init_tensors.items()}
        return {**lora_tensors(self.layers, self.save_dtype), **init}


def _init_key(key: str) -> str:
    """blocks.0.att.key.lora_A -> blocks.0.att.key.init_lora_A"""
    name, _, part = key.rpartition(".")
    return f"{name}.init_{part}"
