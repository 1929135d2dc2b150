"""RWKV-7 "x070" in PyTorch, in the order and with the names of BlinkDL's rwkv_v7_demo.py, and the parts every
RWKV version shares: the RNN state, the Block skeleton and the model's hidden/forward/step API (`RWKV`).
RWKV-6 ("x060") plugs its own time-mix and channel-mix into them (rwkvray/model/rwkv6.py).

The same blocks run a whole sequence (training, prompt prefill) and one token at a time (generation), from any
RNNState. Training takes only the features (`features`); prefill and generation also get the state after the
last token (`hidden`, `forward`, `step`). The WKV backend and recompute are constructor arguments.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvray.model.dims import ModelDims
from rwkvray.kernels import wkv7


@dataclass
class RNNState:
    """Per-layer recurrent state, stacked over layers: [L, batch, ...]."""
    att_shift: torch.Tensor  # [L,B,C]  previous token's ln1 output
    wkv: torch.Tensor        # [L,B,H,N,N] fp32, [value, key] layout
    ffn_shift: torch.Tensor  # [L,B,C]  previous token's ln2 output

    @classmethod
    def zeros(cls, dims: ModelDims, batch: int, device=None, dtype=torch.float32) -> "RNNState":
        L, C = dims.n_layer, dims.n_embd
        shift = torch.zeros(L, batch, C, device=device, dtype=dtype)
        wkv = torch.zeros(L, batch, *dims.state_shape, device=device, dtype=torch.float32)
        return cls(shift, wkv, shift.clone())


def token_shift(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Previous token minus current token; `last` [B,C] is the token before x[:, 0]."""
    return torch.cat([last.unsqueeze(1), x[:, :-1]], 1) - x


class TimeMix(nn.Module):
    def __init__(self, dims: ModelDims, layer_id: int):
        super().__init__()
        C, H, N = dims.n_embd, dims.n_head, dims.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        p = lambda *shape: nn.Parameter(torch.zeros(*shape))
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (p(1, 1, C) for _ in range(6))
        self.w0, self.w1, self.w2 = p(1, 1, C), p(C, dims.dim_w), p(dims.dim_w, C)
        self.a0, self.a1, self.a2 = p(1, 1, C), p(C, dims.dim_a), p(dims.dim_a, C)
        if layer_id > 0:  # layer 0 defines v_first, so it has no value-residual gate
            self.v0, self.v1, self.v2 = p(1, 1, C), p(C, dims.dim_v), p(dims.dim_v, C)
        self.g1, self.g2 = p(C, dims.dim_g), p(dims.dim_g, C)
        self.k_k, self.k_a, self.r_k = p(1, 1, C), p(1, 1, C), p(H, N)
        self.receptance, self.key, self.value, self.output = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x, v_first, last_x, s0, op):
        B, T, C = x.shape
        H = self.n_head
        xx = token_shift(x, last_x)
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # soft clamp: decay in (0.545, 1)
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, -1), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)

        heads = lambda t: t.view(B, T, H, -1)
        y, state = wkv7(heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a), s0, op)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        y = y + ((heads(r) * heads(k) * self.r_k).sum(-1, keepdim=True) * heads(v)).view(B, T, C)
        return self.output(y * g), v_first, x[:, -1], state


class ChannelMix(nn.Module):
    def __init__(self, dims: ModelDims, layer_id: int):
        super().__init__()
        C = dims.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, 4 * C, bias=False)
        self.value = nn.Linear(4 * C, C, bias=False)

    def forward(self, x, last_x):
        k = x + token_shift(x, last_x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2), x[:, -1]


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


class RWKV(nn.Module):
    """Embedding, blocks, ln_out, head; a version subclass names its time-mix and channel-mix classes."""
    time_mix: type[nn.Module]
    channel_mix: type[nn.Module]

    def __init__(self, dims, op: str = "torch", grad_cp: bool = False):
        """op: the WKV backend (auto, torch, cuda or fla); grad_cp: recompute each block in backward instead of
        keeping its activations."""
        super().__init__()
        self.dims, self.op, self.grad_cp = dims, op, grad_cp
        self.emb = nn.Embedding(dims.vocab_size, dims.n_embd)
        self.blocks = nn.ModuleList(Block(dims.n_embd, i, self.time_mix(dims, i), self.channel_mix(dims, i))
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


class RWKV7(RWKV):
    time_mix, channel_mix = TimeMix, ChannelMix


def model_class(version: str) -> type[RWKV]:
    if version == "x060":
        from rwkvray.model.rwkv6 import RWKV6
        return RWKV6
    return RWKV7


def load_model(path: str, device="cpu", dtype=torch.float32, op: str = "torch",
               grad_cp: bool = False) -> tuple[RWKV, torch.Tensor | None]:
    """A BlinkDL checkpoint (x070 or x060, told apart by its keys) as a frozen-ready model running on WKV backend
    `op` (see RWKV), plus the state merged into the file (if any)."""
    from rwkvray.model.checkpoint import load_checkpoint
    ckpt = load_checkpoint(path)
    with torch.device("meta"):  # no throwaway init: the weights come straight from the file
        model = model_class(ckpt.dims.version)(ckpt.dims, op, grad_cp)
    model.load_state_dict(ckpt.weights, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval(), ckpt.time_state


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
