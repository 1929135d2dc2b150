"""The WKV entry points, `wkv7(...)` (RWKV-7) and `wkv6(...)` (RWKV-6), with backends torch, cuda and fla.

wkv7: inputs r, w, k, v, a, b are [B,T,H,N]; w is RWKV-LM's pre-decay (decay = exp(-exp(w)), w <= -0.5);
a and b are the in-context vectors (a = -kk, b = kk * a_gate). s0 is the initial state [B,H,N,N] in the
[value, key] layout (fp32). Returns y [B,T,H,N] in r's dtype and the final state [B,H,N,N] in fp32.
"""
import importlib

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
    return _run("wkv7", (r, w, k, v, a, b), s0, op)


def wkv6(r, w, k, v, u, s0=None, op: str = "torch"):
    """WKV-6 (RWKV-6 "x060"): r, w, k, v [B,T,H,N], w the pre-decay (decay = exp(-exp(w)), unclamped), u the
    bonus [H,N], s0 [B,H,N,N] fp32 in the [value, key] layout. Returns y [B,T,H,N] in r's dtype and the final
    state [B,H,N,N] in fp32."""
    return _run("wkv6", (r, w, k, v, u), s0, op)


def _run(kind: str, inputs: tuple, s0, op: str):
    """One dispatch for both versions: backend `op` of kernel `kind` lives in module `<kind>_<op>`."""
    r = inputs[0]
    B, T, H, N = r.shape
    if s0 is None:
        s0 = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)
    op = resolve_op(op, r.device)
    if op not in BACKENDS:
        raise ValueError(f"unknown WKV op {op!r}: choose one of auto, {', '.join(BACKENDS)}")
    backend = importlib.import_module(f"{__name__}.{kind}_{op}")
    if op != "torch":
        return getattr(backend, f"{kind}_{op}")(*inputs, s0)
    if T == 1:  # one RNN step: the plain recurrence, no chunk padding
        dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
        y, state = getattr(backend, f"{kind}_loop")(*(x.to(dtype) for x in inputs), s0.to(dtype))
        return y.to(r.dtype), state if dtype == torch.float64 else state.float()
    y, state = getattr(backend, f"{kind}_chunked")(*inputs, s0)
    return y.to(r.dtype), state
