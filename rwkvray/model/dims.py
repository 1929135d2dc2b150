"""The shape of an RWKV model, always read from the weights, never asked of the user.

`ModelDimsX070` is RWKV-7, `ModelDimsX060` is RWKV-6. Both are `RWKVDims`, the version-neutral part
(n_layer, n_embd, head_size, vocab_size, n_head, state_shape, version) that states, Serve and the training
loop use; the low-rank sizes differ per version.
"""
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class RWKVDims:
    version: ClassVar[str]
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Shape of one layer's WKV state: [H, N, N] in the [value, key] layout."""
        return (self.n_head, self.head_size, self.head_size)


@dataclass(frozen=True)
class ModelDimsX070(RWKVDims):
    version: ClassVar[str] = "x070"
    dim_w: int  # low-rank dims of the decay, a, v-residual and gate LoRAs
    dim_a: int
    dim_v: int
    dim_g: int


@dataclass(frozen=True)
class ModelDimsX060(RWKVDims):
    version: ClassVar[str] = "x060"
    dim_ffn: int    # ChannelMix hidden size (3.5 C rounded down to a multiple of 32 in RWKV-LM's trainer)
    dim_mix: int    # rank of each of the five token-shift LoRAs (time_maa_w1/w2)
    dim_decay: int  # rank of the decay LoRA (time_decay_w1/w2)
