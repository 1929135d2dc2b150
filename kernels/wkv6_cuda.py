"""WKV-6 on our own CUDA kernels (kernels/cuda/wkv6*), built with ninja on first use and cached like WKV-7's.

The initial state s0 is an input with a gradient (ds0), as in RWKV-PEFT's wkv6state design; u gets its
gradient summed over the batch.
"""
import functools
import hashlib
import os
from pathlib import Path

import torch

from rwkvray.errors import UserError

from .wkv_cuda import CUDA_DIR, first_error_line

SOURCES = ("wkv6.cu", "wkv6_binding.cpp")
HEADERS = ("wkv6.h", "wkv6_kernels.cuh")
HEAD_SIZE = 64


def wkv6_cuda(r, w, k, v, u, s0):
    """Same contract as `rwkvray.kernels.wkv6`: y in r's dtype, final state fp32 [B,H,N,N]."""
    N = r.shape[-1]
    if N != HEAD_SIZE:
        raise UserError(f"WKV op 'cuda' supports head size {HEAD_SIZE} only, got {N}; use op 'fla' or 'torch'")
    if not r.is_cuda:
        raise UserError(f"WKV op 'cuda' needs CUDA tensors, got a tensor on {r.device}; use op 'torch' on the CPU")
    compute = torch.bfloat16 if r.dtype == torch.bfloat16 else torch.float32
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
    """The compiled module; one clear line if CUDA is missing or the build fails."""
    if not torch.cuda.is_available() or not torch.version.cuda:
        raise UserError("WKV op 'cuda' needs an NVIDIA GPU and a CUDA build of PyTorch; use op 'torch' or 'fla'")
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    digest = hashlib.sha256(arch.encode())
    for name in SOURCES + HEADERS:
        digest.update((CUDA_DIR / name).read_bytes())
    name = f"rwkvray_wkv6_{digest.hexdigest()[:16]}"
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions")) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load(name=name, sources=[str(CUDA_DIR / s) for s in SOURCES], extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
                    build_directory=str(build_dir), verbose=False)
    except Exception as error:  # ninja, compiler and linker failures all land here
        raise UserError(f"building the WKV-6 CUDA kernel failed: {first_error_line(error)} "
                        f"(full log: ninja -C {build_dir}); use op 'fla' meanwhile") from error
