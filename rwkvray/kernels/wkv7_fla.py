"""WKV-7 on flash-linear-attention's Triton kernel `fla.ops.rwkv7.chunk_rwkv7` (checked against fla-core 0.6.0).

FLA's conventions differ from ours: it takes the log-decay -exp(w) (never positive), its state is [B,H,K,V]
(the transpose of our [value, key]), and its `scale` must be 1.0 for RWKV. It returns dh0 only for an initial
state that requires grad, which ours does whenever s0 does, since it is a view of s0.

Every argument is passed by keyword, and before its first use on a device the kernel must reproduce the
recurrence on a tiny input: a fork that keeps the names but means other things by them (rwkv-fla orders its
arguments r, k, v, w, a, b) is refused instead of trusted.
"""
import functools
import math

import torch

from rwkvray.errors import UserError

from .fla_import import import_chunk, installed_version, refuse_missing

LOG_DECAY_FLOOR = -math.exp(-0.5)  # w <= -0.5, so -exp(w) >= -exp(-0.5): FLA's `lower_bound` (as its own RWKV7 layer)
REQUIRED = ("r", "w", "k", "v", "a", "b", "scale", "initial_state", "output_final_state")
# fp32 on tensor cores (TF32) stays near 1e-3 and bf16 near 1e-2; swapping two arguments gives errors near 1
SELF_CHECK_BOUND = {torch.float32: 2e-2, torch.float64: 2e-2}
HALF_BOUND = 1e-1


def wkv7_fla(r, w, k, v, a, b, s0):
    """Same contract as `rwkvray.kernels.wkv7`: y in r's dtype, final state fp32 [B,H,N,N]."""
    checked_kernel(r.device, r.shape[-1], r.dtype)
    return call_fla(r, w, k, v, a, b, s0)


def call_fla(r, w, k, v, a, b, s0):
    chunk_rwkv7, options = fla_kernel()
    log_decay = (-w.float().exp()).to(r.dtype)
    initial_state = s0.float().transpose(-1, -2).contiguous()
    y, state = chunk_rwkv7(r=r, w=log_decay, k=k, v=v, a=a, b=b, scale=1.0, initial_state=initial_state,
                           output_final_state=True, **options)
    return y.to(r.dtype), state.float().transpose(-1, -2)


@functools.cache
def fla_kernel():
    """`chunk_rwkv7` and the keyword options this installed version understands."""
    chunk_rwkv7, params = import_chunk("rwkv7")
    refuse_missing("rwkv7", [name for name in REQUIRED if name not in params])
    options = {}
    if "head_first" in params:  # older releases: ask for [B,T,H,N] explicitly
        options["head_first"] = False
    if "safe_gate" in params and "lower_bound" in params:  # newer releases: the faster tensor-core path
        options.update(safe_gate=True, lower_bound=LOG_DECAY_FLOOR)
    return chunk_rwkv7, options


@functools.cache
def checked_kernel(device: torch.device, head_size: int, dtype: torch.dtype):
    """Run FLA once on a tiny input in the caller's dtype (no extra Triton compile) and compare with the
    float64 loop on the same rounded values; refuse it if they disagree."""
    from .wkv7_torch import wkv7_loop
    *values, s0 = self_check_inputs(head_size)
    inputs = [x.to(dtype) for x in values] + [s0.float()]
    with torch.no_grad():
        y, state = call_fla(*(x.to(device) for x in inputs))
        y_ref, state_ref = wkv7_loop(*(x.double() for x in inputs))
    error = max(relative_error(y, y_ref), relative_error(state, state_ref))
    if not error < SELF_CHECK_BOUND.get(dtype, HALF_BOUND):
        raise UserError(f"fla {installed_version()}: chunk_rwkv7 does not reproduce the RWKV-7 recurrence on a "
                        f"tiny self-check (relative error {error:.2g}); its arguments may mean other things than "
                        f"r, w, k, v, a, b (rwkv-fla orders them r, k, v, w, a, b); install fla-core>=0.6.0")


def self_check_inputs(N: int, T: int = 3):
    """One head over a few steps, float64 on the CPU, in the ranges the model produces."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    r, k, v = rand(1, T, 1, N), rand(1, T, 1, N), rand(1, T, 1, N)
    w = -torch.nn.functional.softplus(-2 * rand(1, T, 1, N)) - 0.5
    kk = torch.nn.functional.normalize(rand(1, T, 1, N), dim=-1)
    s0 = rand(1, 1, N, N) * 0.3
    return r, w, k, v, -kk, kk * torch.sigmoid(rand(1, T, 1, N)), s0


def relative_error(got, ref) -> float:
    return ((got.double().cpu() - ref).abs().max() / ref.abs().max()).item()
