"""WKV-7 in plain PyTorch: the float64 reference loop and the chunked form used on the CPU.

Per head, with the state S in the [value, key] layout:
    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t,   d_t = exp(-exp(w_t)).
"""
import torch
import torch.nn.functional as F

from .chunks import chunks

CHUNK = 16  # the decay is >= 0.545, so dividing by its cumulative product stays finite within 16 steps


def wkv7_loop(r, w, k, v, a, b, s0):
    """Token-by-token recurrence; every tensor keeps its dtype (tests run it in float64)."""
    decay = torch.exp(-torch.exp(w))
    state = s0
    ys = []
    for t in range(r.shape[1]):
        sa = state @ a[:, t, :, :, None]  # [B,H,N,1]
        # the two outer products go in place into one new tensor: no state-sized temporaries
        state = (state * decay[:, t, :, None, :]).addcmul_(sa, b[:, t, :, None, :]).addcmul_(
            v[:, t, :, :, None], k[:, t, :, None, :])
        ys.append((state @ r[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, 1), state


def wkv7_chunked(r, w, k, v, a, b, s0):
    """Exact chunked form: inside a chunk, solve one unit lower-triangular system; carry S across chunks."""
    B, T, H, N = r.shape
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    log_decay = -torch.exp(w.to(dtype))
    pad = (-T) % CHUNK
    r, k, v, a, b = (chunks(F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)), CHUNK) for x in (r, k, v, a, b))
    log_decay = chunks(F.pad(log_decay, (0, 0, 0, 0, 0, pad)), CHUNK)  # padded steps keep the state: decay 1

    cum = log_decay.cumsum(-2)                       # [B,H,C,L,N] log of prod of decays up to t
    a_hat = a * torch.exp(cum - log_decay)           # a_t scaled by the decay before step t
    r_hat = r * torch.exp(cum)
    b_hat, k_hat = b * torch.exp(-cum), k * torch.exp(-cum)
    last = torch.exp(cum[..., -1:, :])               # decay across the whole chunk

    strict = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=r.device).tril(-1)
    inclusive = strict | torch.eye(CHUNK, dtype=torch.bool, device=r.device)
    eye = torch.eye(CHUNK, dtype=dtype, device=r.device)
    a_b = (a_hat @ b_hat.transpose(-1, -2)) * strict
    a_k = (a_hat @ k_hat.transpose(-1, -2)) * strict
    # u_t = S_{t-1} a_t = S0 a_hat_t + sum_{j<t} u_j (b_hat_j . a_hat_t) + v_j (k_hat_j . a_hat_t)
    solve = torch.linalg.solve_triangular(eye - a_b, torch.cat([a_hat, a_k @ v], -1), upper=False, unitriangular=True)
    u_from_s0, u_rest = solve[..., :N], solve[..., N:]

    state = s0.to(dtype)
    chunk_states, us = [], []
    for c in range(r.shape[2]):
        chunk_states.append(state)
        u = u_from_s0[:, :, c] @ state.transpose(-1, -2) + u_rest[:, :, c]   # [B,H,L,Nv]
        us.append(u)
        state = (state * last[:, :, c]
                 + u.transpose(-1, -2) @ (b_hat[:, :, c] * last[:, :, c])
                 + v[:, :, c].transpose(-1, -2) @ (k_hat[:, :, c] * last[:, :, c]))
    s_start = torch.stack(chunk_states, 2)
    u = torch.stack(us, 2)
    y = (r_hat @ s_start.transpose(-1, -2)
         + ((r_hat @ b_hat.transpose(-1, -2)) * inclusive) @ u
         + ((r_hat @ k_hat.transpose(-1, -2)) * inclusive) @ v)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, T + pad, H, N)[:, :T]
    return y, state.float() if dtype != torch.float64 else state
