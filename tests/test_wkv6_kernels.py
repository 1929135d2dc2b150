"""The WKV-6 CUDA kernel (s0 in, ds0 out) and FLA's chunk_rwkv6 against the float64 loop.

Without a GPU the kernel source runs on the CPU through rwkvray/kernels/cuda/cpu_emulation.h (one host thread per CUDA
thread). Error measure: max |got - ref| / max |ref|; bounds 1e-4 for fp32 on the CPU, 1e-3 on the GPU
(fast-math exp), 2e-2 for bf16 inputs and outputs.
"""
import ctypes
import importlib.util
import shutil
import subprocess

import pytest
import torch

from rwkvray.kernels import wkv6
from rwkvray.kernels.wkv6_torch import wkv6_loop
from rwkvray.kernels.cuda_build import CUDA_DIR
from tests.helpers import assert_close_to_reference, kernel_case, wkv6_inputs

NAMES = "r w k v u s0".split()
BOUND = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GPU_BOUND = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
CXX = shutil.which("c++") or shutil.which("g++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")


def case(B, T, H, dtype, device="cpu", seed=0):
    """Inputs in `dtype` (u and s0 fp32), upstream gradients, and the float64 reference of those rounded values."""
    return kernel_case(wkv6_inputs(B, T, H, 64, seed=seed), wkv6_loop, 4, dtype, device, seed)


class EmulatedKernel:
    """ctypes access to rwkvray/kernels/cuda/wkv6_emulate.cpp, with the buffers the torch binding allocates."""

    def __init__(self, library):
        self.lib = ctypes.CDLL(str(library))

    def forward(self, xs, keep_for_backward=True):
        r = xs[0]
        B, T, H, N = r.shape
        y, s_final = torch.empty_like(r), torch.empty(B, H, N, N)
        ckpt = torch.empty(B, H, self.lib.wkv6_emulate_checkpoint_count(T), N, N) if keep_for_backward else None
        self.call("forward", r.dtype, B, T, H, *xs, y, s_final, ckpt)
        return y, s_final, ckpt

    def backward(self, xs, dy, ds, ckpt):
        r = xs[0]
        B, T, H, N = r.shape
        drwkv = [torch.empty_like(r) for _ in range(4)]
        du, ds0 = torch.empty(B, H, N), torch.empty(B, H, N, N)
        self.call("backward", r.dtype, B, T, H, *xs[:5], dy, ckpt, ds, *drwkv, du, ds0)
        return [*drwkv, du.sum(0), ds0]

    def call(self, direction, dtype, B, T, H, *tensors):
        suffix = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
        pointers = [ctypes.c_void_p(t.data_ptr() if t is not None else 0) for t in tensors]
        getattr(self.lib, f"wkv6_emulate_{direction}_{suffix}")(B, T, H, *pointers)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    library = tmp_path_factory.mktemp("wkv6_emulate") / "libwkv6_emulate.so"
    command = [CXX, "-std=c++20", "-pthread", "-Wno-unknown-pragmas", "-O2", "-shared", "-fPIC", f"-I{CUDA_DIR}",
               str(CUDA_DIR / "wkv6_emulate.cpp"), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return EmulatedKernel(library)


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,H", [(1, 1, 2), (2, 16, 1), (2, 37, 2)])
def test_emulated_cuda_kernel_matches_float64_loop(emulated, dtype, B, T, H):
    xs, dy, ds, reference = case(B, T, H, dtype)
    y, s_final, ckpt = emulated.forward(xs)
    grads = emulated.backward(xs, dy, ds, ckpt)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads[:4])
    assert_close_to_reference([y, s_final, *grads], reference, BOUND[dtype], NAMES)


@needs_cxx
def test_emulated_forward_without_backward_buffers_gives_the_same_outputs(emulated):
    xs, _, _, _ = case(1, 20, 1, torch.float32)
    y, s_final, _ = emulated.forward(xs)
    y_lean, s_lean, _ = emulated.forward(xs, keep_for_backward=False)
    assert torch.equal(y, y_lean) and torch.equal(s_final, s_lean)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,H", [(1, 1, 2), (2, 100, 4), (1, 300, 2)])
def test_cuda_kernel_matches_float64_loop(dtype, B, T, H):
    xs, dy, ds, reference = case(B, T, H, dtype, device="cuda")
    xs = [x.requires_grad_() for x in xs]
    y, s = wkv6(*xs, op="cuda")
    grads = torch.autograd.grad((y.float() * dy.float()).sum() + (s * ds).sum(), xs)
    assert_close_to_reference([y, s, *grads], [t.cuda() for t in reference], GPU_BOUND[dtype], NAMES)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention")
@pytest.mark.parametrize("B,T,H", [(1, 64, 2), (2, 100, 2)])
def test_fla_chunk_rwkv6_matches_float64_loop(B, T, H):
    xs, dy, ds, reference = case(B, T, H, torch.bfloat16, device="cuda")
    xs = [x.requires_grad_() for x in xs]
    y, s = wkv6(*xs, op="fla")
    grads = torch.autograd.grad((y.float() * dy.float()).sum() + (s * ds).sum(), xs)
    assert_close_to_reference([y, s, *grads], [t.cuda() for t in reference], 5e-2, NAMES)


def test_fla_chunk_rwkv6_under_the_triton_interpreter(triton_interpreter):
    """FLA's kernel on the CPU, called exactly as on a GPU: log-decay, [K,V] state, scale 1, by keyword."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: test_fla_chunk_rwkv6_matches_float64_loop runs the compiled kernel")
    pytest.importorskip("fla")
    xs, dy, ds, reference = case(1, 40, 1, torch.float32)
    xs = [x.requires_grad_() for x in xs]
    y, s = wkv6(*xs, op="fla")
    grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), xs)
    assert_close_to_reference([y, s, *grads], reference, BOUND[torch.float32], NAMES)
