"""Building our CUDA kernels (rwkvray/kernels/cuda/) with ninja on first use, for WKV-7 and WKV-6 alike.

The extension's name carries a hash of the sources and the GPU architecture, so an edited kernel or another
GPU gets a fresh build while an unchanged one is loaded from torch's extension cache in about a second.
"""
import hashlib
import os
from pathlib import Path

import torch

from rwkvray.errors import UserError

CUDA_DIR = Path(__file__).parent / "cuda"
HEAD_SIZE = 64


def compute_dtype(r) -> torch.dtype:
    """The kernels' dtype for inputs like r (bf16 stays bf16, the rest runs in fp32), after refusing what they
    cannot take: another head size, or tensors off the GPU."""
    N = r.shape[-1]
    if N != HEAD_SIZE:
        raise UserError(f"WKV op 'cuda' supports head size {HEAD_SIZE} only, got {N}; use op 'fla' or 'torch'")
    if not r.is_cuda:
        raise UserError(f"WKV op 'cuda' needs CUDA tensors, got a tensor on {r.device}; use op 'torch' on the CPU")
    return torch.bfloat16 if r.dtype == torch.bfloat16 else torch.float32


def build_extension(kind: str, title: str, sources: tuple, headers: tuple):
    """The compiled module for one kernel family; one clear line if CUDA is missing or the build fails."""
    if not torch.cuda.is_available() or not torch.version.cuda:
        raise UserError("WKV op 'cuda' needs an NVIDIA GPU and a CUDA build of PyTorch; use op 'torch' or 'fla'")
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    name = f"rwkvray_{kind}_{source_digest(arch, sources + headers)}"
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions")) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load(
            name=name,
            sources=[str(CUDA_DIR / s) for s in sources],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as error:  # ninja, compiler and linker failures all land here
        raise UserError(f"building the {title} CUDA kernel failed: {first_error_line(error)} "
                        f"(full log: ninja -C {build_dir}); use op 'fla' meanwhile") from error


def first_error_line(error: Exception) -> str:
    """torch's message starts 'Error building extension ...'; the compiler's own first error comes next."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors[1:2] or errors[:1] or lines[:1] or [type(error).__name__])[0]


def source_digest(arch: str, files: tuple) -> str:
    digest = hashlib.sha256(arch.encode())
    for name in files:
        digest.update((CUDA_DIR / name).read_bytes())
    return digest.hexdigest()[:16]
