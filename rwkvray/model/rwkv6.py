"""RWKV-6 "x060" in PyTorch, in the order and with the names of RWKV-LM's RWKV_Tmix_x060 / RWKV_CMix_x060.

It plugs into the version-neutral model of rwkvray/model/rwkv.py (Block, RNNState, hidden/forward/step), so
state tuning, generation, Serve and the PEFT methods run on it unchanged. Its RNN state has the same three
tensors per layer as RWKV-7's: the att shift [C], the WKV state [H,N,N] fp32 in the [value, key] layout, and
the ffn shift [C].
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvray.model.dims import ModelDimsX060
from rwkvray.kernels import wkv6
from rwkvray.model.token_shift import token_shift

HEAD_SIZE_DIVISOR = 8  # RWKV-LM's default: ln_x eps = 1e-5 * 8**2 = 64e-5, as the rwkv package uses
MIXES = 5              # the token-shift LoRA makes one mix each for w, k, v, r, g (in that order)


class TimeMix(nn.Module):
    def __init__(self, dims: ModelDimsX060, layer_id: int):
        super().__init__()
        C, H, N = dims.n_embd, dims.n_head, dims.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        p = lambda *shape: nn.Parameter(torch.zeros(*shape))
        self.time_maa_x, self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g = (
            p(1, 1, C) for _ in range(6))
        self.time_maa_w1, self.time_maa_w2 = p(C, MIXES * dims.dim_mix), p(MIXES, dims.dim_mix, C)
        self.time_decay = p(1, 1, C)
        self.time_decay_w1, self.time_decay_w2 = p(C, dims.dim_decay), p(dims.dim_decay, C)
        self.time_faaaa = p(H, N)
        self.receptance, self.key, self.value, self.output, self.gate = (
            nn.Linear(C, C, bias=False) for _ in range(5))
        self.ln_x = nn.GroupNorm(H, C, eps=1e-5 * HEAD_SIZE_DIVISOR ** 2)

    def forward(self, x, v_first, last_x, s0, op):
        B, T, C = x.shape
        xx = token_shift(x, last_x)
        # data-dependent lerp: one shared low-rank map of x + xx*maa_x yields an extra mix for each of w,k,v,r,g
        hidden = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B, T, MIXES, -1)
        extra = torch.einsum("btmd,mdc->mbtc", hidden, self.time_maa_w2)
        maa = (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)
        xw, xk, xv, xr, xg = (x + xx * (m + e) for m, e in zip(maa, extra))

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        # data-dependent decay, in fp32 (at least) as the rwkv package does: decay = exp(-exp(w)) is sensitive near 1
        wide = torch.promote_types(x.dtype, torch.float32)
        w = self.time_decay.to(wide) + (torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).to(wide)

        heads = lambda t: t.view(B, T, self.n_head, -1)
        y, state = wkv6(heads(r), heads(w), heads(k), heads(v), self.time_faaaa, s0, op)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), v_first, x[:, -1], state


class ChannelMix(nn.Module):
    def __init__(self, dims: ModelDimsX060, layer_id: int):
        super().__init__()
        C = dims.n_embd
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, dims.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(dims.dim_ffn, C, bias=False)

    def forward(self, x, last_x):
        xx = token_shift(x, last_x)
        k = self.key(x + xx * self.time_maa_k)
        r = self.receptance(x + xx * self.time_maa_r)
        return torch.sigmoid(r) * self.value(torch.relu(k) ** 2), x[:, -1]
