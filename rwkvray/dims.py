"""The shape of an RWKV-7 model, always read from the weights, never asked of the user."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    dim_w: int  # low-rank dims of the decay, a, v-residual and gate LoRAs
    dim_a: int
    dim_v: int
    dim_g: int

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Shape of one layer's WKV state: [H, N, N] in the [value, key] layout."""
        return (self.n_head, self.head_size, self.head_size)
