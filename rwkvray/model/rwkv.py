"""The RWKV model of any version: the RNN state, the Block skeleton, the model's hidden/forward/step API (`RWKV`)
and loading a checkpoint. Each version brings only its time-mix and channel-mix: RWKV-7 "x070" in
rwkvray/model/rwkv7.py, RWKV-6 "x060" in rwkvray/model/rwkv6.py; the weights' dims say which.

The same blocks run a whole sequence (training, prompt prefill) and one token at a time (generation), from any
RNNState. Training takes only the features (`features`); prefill and generation also get the state after the
last token (`hidden`, `forward`, `step`). The WKV backend and recompute are constructor arguments.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from rwkvray.model import rwkv6, rwkv7
from rwkvray.model.dims import RWKVDims


@dataclass
class RNNState:
    """Per-layer recurrent state, stacked over layers: [L, batch, ...]."""
    att_shift: torch.Tensor  # [L,B,C]  previous token's ln1 output
    wkv: torch.Tensor        # [L,B,H,N,N] fp32, [value, key] layout
    ffn_shift: torch.Tensor  # [L,B,C]  previous token's ln2 output

    @classmethod
    def zeros(cls, dims: RWKVDims, batch: int, device=None, dtype=torch.float32) -> "RNNState":
        L, C = dims.n_layer, dims.n_embd
        shift = torch.zeros(L, batch, C, device=device, dtype=dtype)
        wkv = torch.zeros(L, batch, *dims.state_shape, device=device, dtype=torch.float32)
        return cls(shift, wkv, shift.clone())


class Block(nn.Module):
    """x = x + att(ln1(x)); x = x + ffn(ln2(x)), with ln0 first in block 0. `v_first` is RWKV-7's value residual;
    an RWKV-6 time-mix passes it through untouched."""

    def __init__(self, n_embd: int, layer_id: int, att: nn.Module, ffn: nn.Module):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd)
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.att = att
        self.ffn = ffn

    def forward(self, x, v_first, att_shift, wkv, ffn_shift, op):
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        dx, v_first, att_shift, wkv = self.att(self.ln1(x), v_first, att_shift, wkv, op)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, v_first, att_shift, wkv, ffn_shift


# version (as the dims name it) -> its time-mix and channel-mix
MIXES = {"x070": (rwkv7.TimeMix, rwkv7.ChannelMix), "x060": (rwkv6.TimeMix, rwkv6.ChannelMix)}


class RWKV(nn.Module):
    """Embedding, blocks, ln_out, head; the blocks hold the time-mix and channel-mix of the dims' version."""

    def __init__(self, dims: RWKVDims, op: str = "torch", grad_cp: bool = False):
        """op: the WKV backend (auto, torch, cuda or fla); grad_cp: recompute each block in backward instead of
        keeping its activations."""
        super().__init__()
        self.dims, self.op, self.grad_cp = dims, op, grad_cp
        time_mix, channel_mix = MIXES[dims.version]
        self.emb = nn.Embedding(dims.vocab_size, dims.n_embd)
        self.blocks = nn.ModuleList(Block(dims.n_embd, i, time_mix(dims, i), channel_mix(dims, i))
                                    for i in range(dims.n_layer))
        self.ln_out = nn.LayerNorm(dims.n_embd)
        self.head = nn.Linear(dims.n_embd, dims.vocab_size, bias=False)

    def layers(self, idx: torch.Tensor, state: RNNState | None):
        """Runs the blocks in order, yielding x after each and that layer's (att_shift, wkv, ffn_shift) after the
        last token."""
        x = self.emb(idx)
        if state is None:
            state = RNNState.zeros(self.dims, idx.shape[0], idx.device, x.dtype)
        v_first = None
        for i, block in enumerate(self.blocks):
            args = (x, v_first, state.att_shift[i].to(x.dtype), state.wkv[i], state.ffn_shift[i].to(x.dtype), self.op)
            if self.grad_cp and torch.is_grad_enabled():
                x, v_first, *layer_state = checkpoint(block, *args, use_reentrant=False)
            else:
                x, v_first, *layer_state = block(*args)
            yield x, layer_state

    def features(self, idx: torch.Tensor, state: RNNState | None = None) -> torch.Tensor:
        """Training: final-layer features after ln_out, [B,T,C]; each layer's end state is dropped as it comes.
        The head is applied by the loss, in chunks."""
        for x, _ in self.layers(idx, state):
            pass
        return self.ln_out(x)

    def hidden(self, idx: torch.Tensor, state: RNNState | None = None) -> tuple[torch.Tensor, RNNState]:
        """Inference: the features after ln_out [B,T,C] and the state after the last token."""
        layer_states = []
        for x, layer_state in self.layers(idx, state):
            layer_states.append(layer_state)
        return self.ln_out(x), RNNState(*(torch.stack(parts) for parts in zip(*layer_states)))

    def forward(self, idx: torch.Tensor, state: RNNState | None = None) -> tuple[torch.Tensor, RNNState]:
        """Logits [B,T,V] and the state after the last token."""
        x, state = self.hidden(idx, state)
        return self.head(x), state

    def step(self, tokens: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        """RNN mode: one token per row, [B] -> logits [B,V]."""
        logits, state = self.forward(tokens.unsqueeze(1), state)
        return logits[:, 0], state


def load_model(path: str, device="cpu", dtype=torch.float32, op: str = "torch",
               grad_cp: bool = False) -> tuple[RWKV, torch.Tensor | None]:
    """A BlinkDL checkpoint (x070 or x060, told apart by its keys) as a frozen-ready model running on WKV backend
    `op` (see RWKV), plus the state merged into the file (if any)."""
    from rwkvray.model.checkpoint import load_checkpoint
    ckpt = load_checkpoint(path)
    with torch.device("meta"):  # no throwaway init: the weights come straight from the file
        model = RWKV(ckpt.dims, op, grad_cp)
    model.load_state_dict(ckpt.weights, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval(), ckpt.time_state


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
