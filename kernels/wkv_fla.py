"""WKV-7 on flash-linear-attention's Triton kernel `fla.ops.rwkv7.chunk_rwkv7` (checked against fla-core 0.6.0).

FLA's conventions differ from ours: it takes the log-decay -exp(w) (never positive), its state is [B,H,K,V]
(the transpose of our [value, key]), and its `scale` must be 1.0 for RWKV. It returns dh0 only for an initial
state that requires grad, which ours does whenever s0 does, since it is a view of s0.
"""
import functools
import inspect
import math

from rwkvray.errors import UserError

LOG_DECAY_FLOOR = -math.exp(-0.5)  # w <= -0.5, so -exp(w) >= -exp(-0.5): FLA's `lower_bound` (as its own RWKV7 layer)
REQUIRED = ("scale", "initial_state", "output_final_state")


def wkv7_fla(r, w, k, v, a, b, s0):
    """Same contract as `rwkvray.kernels.wkv7`: y in r's dtype, final state fp32 [B,H,N,N]."""
    chunk_rwkv7, options = fla_kernel()
    log_decay = (-w.float().exp()).to(r.dtype)
    initial_state = s0.float().transpose(-1, -2).contiguous()
    y, state = chunk_rwkv7(r, log_decay, k, v, a, b, scale=1.0, initial_state=initial_state,
                           output_final_state=True, **options)
    return y.to(r.dtype), state.float().transpose(-1, -2)


@functools.cache
def fla_kernel():
    """`chunk_rwkv7` and the keyword options this installed version understands."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as error:
        raise UserError(f"WKV op 'fla' needs flash-linear-attention (pip install fla-core>=0.6.0): {error}") from None
    params = inspect.signature(chunk_rwkv7).parameters
    missing = [name for name in REQUIRED if name not in params]
    if missing:
        raise UserError(f"fla {installed_version()} has a chunk_rwkv7 without {', '.join(missing)}; "
                        f"install fla-core>=0.6.0")
    options = {}
    if "head_first" in params:  # older releases: ask for [B,T,H,N] explicitly
        options["head_first"] = False
    if "safe_gate" in params and "lower_bound" in params:  # newer releases: the faster tensor-core path
        options.update(safe_gate=True, lower_bound=LOG_DECAY_FLOOR)
    return chunk_rwkv7, options


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for package in ("fla-core", "flash-linear-attention"):
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    return "(unknown version)"
