"""RWKV-7 "x070" time-mix and channel-mix in PyTorch, in the order and with the names of BlinkDL's
rwkv_v7_demo.py. The rest of the model (Block, RNNState, hidden/forward/step) is version-neutral:
rwkvray/model/rwkv.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvray.kernels import wkv7
from rwkvray.model.dims import ModelDimsX070
from rwkvray.model.token_shift import token_shift


class TimeMix(nn.Module):
    def __init__(self, dims: ModelDimsX070, layer_id: int):
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
    def __init__(self, dims: ModelDimsX070, layer_id: int):
        super().__init__()
        C = dims.n_embd
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, 4 * C, bias=False)
        self.value = nn.Linear(4 * C, C, bias=False)

    def forward(self, x, last_x):
        k = x + token_shift(x, last_x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2), x[:, -1]
