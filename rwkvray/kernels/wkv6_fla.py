"""WKV-6 on flash-linear-attention's Triton kernel `fla.ops.rwkv6.chunk_rwkv6` (checked against fla-core 0.6.0).

Called by keyword. FLA's conventions: its 4th input is the log-decay -exp(w) (never positive) over keys, named
`w` in fla-core 0.6 and `g` in older releases; u is the bonus [H,K]; its state is [B,H,K,V] (the transpose of our
[value, key]); `scale` must be 1.0 for RWKV (FLA defaults to 1/sqrt(K)).
"""
import functools

from .fla_import import import_chunk, refuse_missing

REQUIRED = ("r", "k", "v", "u", "scale", "initial_state", "output_final_state")


def wkv6_fla(r, w, k, v, u, s0):
    """Same contract as `rwkvray.kernels.wkv6`: y in r's dtype, final state fp32 [B,H,N,N]."""
    chunk_rwkv6, decay_name, options = fla_kernel()
    log_decay = (-w.float().exp()).to(r.dtype)
    initial_state = s0.float().transpose(-1, -2).contiguous()
    y, state = chunk_rwkv6(r=r, k=k, v=v, u=u.to(r.dtype), scale=1.0, initial_state=initial_state,
                           output_final_state=True, **{decay_name: log_decay}, **options)
    return y.to(r.dtype), state.float().transpose(-1, -2)


@functools.cache
def fla_kernel():
    """`chunk_rwkv6`, the name of its log-decay argument and the keyword options this installed version needs."""
    chunk_rwkv6, params = import_chunk("rwkv6")
    decay_name = next((name for name in ("w", "g") if name in params), None)
    refuse_missing("rwkv6", [name for name in REQUIRED if name not in params] + ([] if decay_name else ["w (or g)"]))
    options = {"head_first": False} if "head_first" in params else {}  # older releases: ask for [B,T,H,N]
    return chunk_rwkv6, decay_name, options
