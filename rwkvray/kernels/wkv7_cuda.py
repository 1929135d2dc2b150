"""WKV-7 on our own CUDA kernels (rwkvray/kernels/cuda/wkv7*), built with ninja on first use and cached (see
cuda_build.py)."""
import functools

import torch

from .cuda_build import build_extension, compute_dtype

SOURCES = ("wkv7.cu", "wkv7_binding.cpp")
HEADERS = ("wkv7.h", "wkv7_kernels.cuh", "wkv_device.cuh")


def wkv7_cuda(r, w, k, v, a, b, s0):
    """Same contract as `rwkvray.kernels.wkv7`: y in r's dtype, final state fp32 [B,H,N,N]."""
    compute = compute_dtype(r)
    y, state = WKV7Function.apply(*(x.to(compute).contiguous() for x in (r, w, k, v, a, b)),
                                  s0.float().contiguous())
    return y.to(r.dtype), state


class WKV7Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        keep = any(ctx.needs_input_grad)
        outputs = extension().forward(r, w, k, v, a, b, s0, keep)
        if keep:
            y, state, sa, ckpt = outputs
            ctx.save_for_backward(r, w, k, v, a, b, sa, ckpt)
        else:
            y, state = outputs
        return y, state

    @staticmethod
    def backward(ctx, dy, d_state):
        r, w, k, v, a, b, sa, ckpt = ctx.saved_tensors
        return tuple(extension().backward(r, w, k, v, a, b, dy.to(r.dtype).contiguous(),
                                          d_state.float().contiguous(), sa, ckpt))


@functools.cache
def extension():
    return build_extension("wkv7", "WKV-7", SOURCES, HEADERS)
