"""WKV-6 on our own CUDA kernels (rwkvray/kernels/cuda/wkv6*), built with ninja on first use and cached (see
cuda_build.py).

The initial state s0 is an input with a gradient (ds0), as in RWKV-PEFT's wkv6state design; u gets its
gradient summed over the batch.
"""
import functools

import torch

from .cuda_build import build_extension, compute_dtype

SOURCES = ("wkv6.cu", "wkv6_binding.cpp")
HEADERS = ("wkv6.h", "wkv6_kernels.cuh", "wkv_device.cuh")


def wkv6_cuda(r, w, k, v, u, s0):
    """Same contract as `rwkvray.kernels.wkv6`: y in r's dtype, final state fp32 [B,H,N,N]."""
    compute = compute_dtype(r)
    y, state = WKV6Function.apply(*(x.to(compute).contiguous() for x in (r, w, k, v)), u.float().contiguous(),
                                  s0.float().contiguous())
    return y.to(r.dtype), state


class WKV6Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, u, s0):
        keep = any(ctx.needs_input_grad)
        outputs = extension().forward(r, w, k, v, u, s0, keep)
        if keep:
            y, state, ckpt = outputs
            ctx.save_for_backward(r, w, k, v, u, ckpt)
        else:
            y, state = outputs
        return y, state

    @staticmethod
    def backward(ctx, dy, d_state):
        r, w, k, v, u, ckpt = ctx.saved_tensors
        return tuple(extension().backward(r, w, k, v, u, dy.to(r.dtype).contiguous(), d_state.float().contiguous(),
                                          ckpt))


@functools.cache
def extension():
    return build_extension("wkv6", "WKV-6", SOURCES, HEADERS)
