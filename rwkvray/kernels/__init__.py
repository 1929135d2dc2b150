"""The WKV entry points, `wkv7(...)` (RWKV-7) and `wkv6(...)` (RWKV-6), with backends torch, cuda and fla.

wkv7: inputs r, w, k, v, a, b are [B,T,H,N]; w is RWKV-LM's pre-decay (decay = exp(-exp(w)), w <= -0.5);
a and b are the in-context vectors (a = -kk, b = kk * a_gate). s0 is the initial state [B,H,N,N] in the
[value, key] layout (fp32). Returns y [B,T,H,N] in r's dtype and the final state [B,H,N,N] in fp32.
"""
import torch

BACKENDS = ("torch", "cuda", "fla")


def resolve_op(op: str, device: torch.device) -> str:
    """`auto`: our CUDA kernel on NVIDIA, FLA on other Triton GPUs, torch on the CPU."""
    if op != "auto":
        return op
    if device.type != "cuda":
        return "torch"
    return "cuda" if torch.version.cuda else "fla"


def wkv7(r, w, k, v, a, b, s0=None, op: str = "torch"):
    B, T, H, N = r.shape
    if s0 is None:
        s0 = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)
    op = resolve_op(op, r.device)
    if op == "torch":
        from .wkv_torch import wkv7_chunked, wkv7_loop
        if T == 1:  # one RNN step: the plain recurrence, no chunk padding
            dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
            y, state = wkv7_loop(*(x.to(dtype) for x in (r, w, k, v, a, b)), s0.to(dtype))
            return y.to(r.dtype), state if dtype == torch.float64 else state.float()
        y, state = wkv7_chunked(r, w, k, v, a, b, s0)
        return y.to(r.dtype), state
    if op == "cuda":
        from .wkv_cuda import wkv7_cuda
        return wkv7_cuda(r, w, k, v, a, b, s0)
    if op == "fla":
        from .wkv_fla import wkv7_fla
        return wkv7_fla(r, w, k, v, a, b, s0)
    raise ValueError(f"unknown WKV op {op!r}: choose one of auto, {', '.join(BACKENDS)}")


def wkv6(r, w, k, v, u, s0=None, op: str = "torch"):
    """WKV-6 (RWKV-6 "x060"): r, w, k, v [B,T,H,N], w the pre-decay (decay = exp(-exp(w)), unclamped), u the
    bonus [H,N], s0 [B,H,N,N] fp32 in the [value, key] layout. Returns y [B,T,H,N] in r's dtype and the final
    state [B,H,N,N] in fp32."""
    B, T, H, N = r.shape
    if s0 is None:
        s0 = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)
    op = resolve_op(op, r.device)
    if op == "torch":
        from .wkv6_torch import wkv6_chunked, wkv6_loop
        if T == 1:
            dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
            y, state = wkv6_loop(*(x.to(dtype) for x in (r, w, k, v, u, s0)))
            return y.to(r.dtype), state if dtype == torch.float64 else state.float()
        y, state = wkv6_chunked(r, w, k, v, u, s0)
        return y.to(r.dtype), state
    if op == "cuda":
        from .wkv6_cuda import wkv6_cuda
        return wkv6_cuda(r, w, k, v, u, s0)
    if op == "fla":
        from .wkv6_fla import wkv6_fla
        return wkv6_fla(r, w, k, v, u, s0)
    raise ValueError(f"unknown WKV op {op!r}: choose one of auto, {', '.join(BACKENDS)}")
