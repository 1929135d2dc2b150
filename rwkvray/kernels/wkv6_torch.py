"""WKV-6 in plain PyTorch: the float64 reference loop and the chunked form used on the CPU.

Per head, with the state S in the [value, key] layout, d_t = exp(-exp(w_t)) a per-key decay and u the bonus:
    y_t = S_{t-1} r_t + v_t (k_t . (u * r_t)),   S_t = S_{t-1} diag(d_t) + v_t k_t^T.
RWKV-6 does not clamp its decay, so d_t may underflow to 0: the chunked form never divides by a decay product.
Every exponent it takes is a sum of log-decays over a time span, hence <= 0.
"""
import torch
import torch.nn.functional as F

from .chunks import chunks

CHUNK = 16


def wkv6_loop(r, w, k, v, u, s0):
    """Token-by-token recurrence; every tensor keeps its dtype (tests run it in float64)."""
    decay = torch.exp(-torch.exp(w))
    state = s0
    ys = []
    for t in range(r.shape[1]):
        bonus = (k[:, t] * u * r[:, t]).sum(-1, keepdim=True) * v[:, t]
        ys.append((state @ r[:, t, :, :, None]).squeeze(-1) + bonus)
        state = (state * decay[:, t, :, None, :]).addcmul_(v[:, t, :, :, None], k[:, t, :, None, :])
    return torch.stack(ys, 1), state


def wkv6_chunked(r, w, k, v, u, s0):
    """Exact chunked form: pairwise decays inside a chunk of 16, the state carried across chunks."""
    B, T, H, N = r.shape
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    pad = (-T) % CHUNK
    log_decay = -torch.exp(w.to(dtype))
    r, k, v = (chunks(F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)), CHUNK) for x in (r, k, v))
    log_decay = chunks(F.pad(log_decay, (0, 0, 0, 0, 0, pad)), CHUNK)  # padded steps: decay 1, k = v = 0
    u = u.to(dtype)

    # Each span of log-decays is summed directly: a difference of two long cumsums would cancel badly.
    cum = log_decay.cumsum(-2)                                               # [B,H,C,L,N] steps 0..t
    before = F.pad(cum[..., :-1, :], (0, 0, 1, 0))                           # steps 0..t-1
    after = F.pad(log_decay.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))  # steps t+1..L-1
    step = torch.arange(CHUNK, device=r.device)
    t, j, s = step[:, None, None], step[None, :, None], step[None, None, :]
    between = ((j < s) & (s < t)).to(dtype)                                  # [t,j,s]
    span = torch.einsum("tjs,...sn->...tjn", between, log_decay)             # steps j+1..t-1
    span = span.masked_fill((j >= t)[..., 0, None], float("-inf"))           # only j < t reads k_j through S
    scores = torch.einsum("...ti,...ji,...tji->...tj", r, k, span.exp())      # r_t . (decay j+1..t-1) k_j
    bonus = (r * u[:, None, None, :] * k).sum(-1, keepdim=True) * v           # u: [H,N] -> [H,1,1,N]
    y_inner = scores @ v + bonus
    r_from_start = r * before.exp()
    k_to_end = k * after.exp()
    chunk_decay = cum[..., -1, :].exp()              # [B,H,C,N]

    state = s0.to(dtype)
    ys = []
    for c in range(r.shape[2]):
        ys.append(r_from_start[:, :, c] @ state.transpose(-1, -2) + y_inner[:, :, c])
        state = state * chunk_decay[:, :, c, None, :] + v[:, :, c].transpose(-1, -2) @ k_to_end[:, :, c]
    y = torch.stack(ys, 2).permute(0, 2, 3, 1, 4).reshape(B, T + pad, H, N)[:, :T]
    return y, state.float() if dtype != torch.float64 else state
