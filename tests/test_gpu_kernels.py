"""The GPU WKV-7 backends (cuda, fla) against the float64 reference loop.

Without a GPU: the CUDA kernel source runs on the CPU through rwkvray/kernels/cuda/cpu_emulation.h (one host thread
per CUDA thread), so its arithmetic, indexing, checkpointing and barriers are tested here too, and ptxas
reports its registers when nvcc is present; the FLA wrapper's keyword call, version gate and self-check are
tested against stand-ins (FLA itself runs under Triton's interpreter in tests/test_fla_interp.py).
With a GPU: both backends run for real.

Error measure everywhere: max |got - ref| / max |ref| (relative error of the max-abs). Bounds: 1e-4 for the
fp32 kernel on the CPU, 1e-3 on the GPU (fast-math exp), 2e-2 for bf16 inputs and outputs.
"""
import ctypes
import importlib.util
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

from rwkvray.errors import UserError
from rwkvray.kernels import wkv7
from rwkvray.kernels import wkv7_fla
from rwkvray.kernels.cuda_build import CUDA_DIR, first_error_line
from rwkvray.kernels.wkv7_torch import wkv7_loop
from tests.helpers import assert_close_to_reference, kernel_case, rel_err, wkv7_inputs

NAMES = "r w k v a b s0".split()
BOUND = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GPU_BOUND = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
needs_fla = pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention")
CXX = shutil.which("c++") or shutil.which("g++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")


def case(B, T, H, dtype, device="cpu", seed=0):
    """Inputs in `dtype` (s0 fp32), upstream gradients, and the float64 reference of those rounded values."""
    return kernel_case(wkv7_inputs(B, T, H, 64, seed=seed), wkv7_loop, 6, dtype, device, seed)


# ---- the CUDA kernel's source, run on the CPU ---------------------------------------------------------------

class EmulatedKernel:
    """ctypes access to rwkvray/kernels/cuda/wkv7_emulate.cpp, with the buffers the torch binding would allocate."""

    def __init__(self, library):
        self.lib = ctypes.CDLL(str(library))

    def forward(self, xs, keep_for_backward=True):
        r, s0 = xs[0], xs[6]
        B, T, H, N = r.shape
        y, s_final = torch.empty_like(r), torch.empty(B, H, N, N)
        sa = torch.empty(B, T, H, N) if keep_for_backward else None
        ckpt = torch.empty(B, H, self.lib.wkv7_emulate_checkpoint_count(T), N, N) if keep_for_backward else None
        self.call("forward", r.dtype, B, T, H, *xs[:6], s0, y, s_final, sa, ckpt)
        return y, s_final, sa, ckpt

    def backward(self, xs, dy, ds, sa, ckpt):
        r = xs[0]
        B, T, H, N = r.shape
        grads = [torch.empty_like(r) for _ in range(6)] + [torch.empty(B, H, N, N)]
        self.call("backward", r.dtype, B, T, H, *xs[:6], dy, sa, ckpt, ds, *grads)
        return grads

    def call(self, direction, dtype, B, T, H, *tensors):
        suffix = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
        pointers = [ctypes.c_void_p(t.data_ptr() if t is not None else 0) for t in tensors]
        getattr(self.lib, f"wkv7_emulate_{direction}_{suffix}")(B, T, H, *pointers)


def compile_cpp(sources, output, *flags):
    command = [CXX, "-std=c++20", "-pthread", "-Wno-unknown-pragmas", *flags, f"-I{CUDA_DIR}",
               *map(str, sources), "-o", str(output)]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    library = tmp_path_factory.mktemp("wkv7_emulate") / "libwkv7_emulate.so"
    result = compile_cpp([CUDA_DIR / "wkv7_emulate.cpp"], library, "-O2", "-shared", "-fPIC")
    assert result.returncode == 0, result.stderr
    return EmulatedKernel(library)


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,H", [(1, 1, 2), (3, 15, 2), (2, 16, 2), (2, 100, 2)])
def test_emulated_cuda_kernel_matches_float64_loop(emulated, dtype, B, T, H):
    xs, dy, ds, reference = case(B, T, H, dtype)
    y, s_final, sa, ckpt = emulated.forward(xs)
    grads = emulated.backward(xs, dy, ds, sa, ckpt)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads[:6]) and grads[6].dtype == torch.float32
    assert_close_to_reference([y, s_final, *grads], reference, BOUND[dtype], NAMES)


@needs_cxx
def test_emulated_forward_without_backward_buffers_gives_the_same_outputs(emulated):
    xs, _, _, _ = case(2, 37, 2, torch.float32)
    y, s_final, _, _ = emulated.forward(xs)
    y_lean, s_lean, _, _ = emulated.forward(xs, keep_for_backward=False)
    assert torch.equal(y, y_lean) and torch.equal(s_final, s_lean)


RACE_DRIVER = r"""
#include <cstddef>
#include <vector>
extern "C" {
int wkv7_emulate_checkpoint_count(int);
void wkv7_emulate_forward_f32(int, int, int, const float*, const float*, const float*, const float*, const float*,
                              const float*, const float*, float*, float*, float*, float*);
void wkv7_emulate_backward_f32(int, int, int, const float*, const float*, const float*, const float*,
                               const float*, const float*, const float*, const float*, const float*, const float*,
                               float*, float*, float*, float*, float*, float*, float*);
}
int main() {
    const int B = 1, H = 1, N = 64;
    for (int T : {17, 40}) {
        const std::size_t n = std::size_t(B) * T * H * N, ns = std::size_t(B) * H * N * N;
        std::vector<float> x(n, 0.1f), w(n, -1.f), s0(ns, 0.2f), y(n), s(ns), sa(n), dy(n, 1.f), ds(ns, 1.f);
        std::vector<float> ckpt(ns * wkv7_emulate_checkpoint_count(T));
        std::vector<std::vector<float>> grad(6, std::vector<float>(n));
        std::vector<float> ds0(ns);
        wkv7_emulate_forward_f32(B, T, H, x.data(), w.data(), x.data(), x.data(), x.data(), x.data(), s0.data(),
                                 y.data(), s.data(), sa.data(), ckpt.data());
        wkv7_emulate_backward_f32(B, T, H, x.data(), w.data(), x.data(), x.data(), x.data(), x.data(), dy.data(),
                                  sa.data(), ckpt.data(), ds.data(), grad[0].data(), grad[1].data(), grad[2].data(),
                                  grad[3].data(), grad[4].data(), grad[5].data(), ds0.data());
    }
}
"""


@needs_cxx
def test_emulated_cuda_kernel_has_no_shared_memory_race(tmp_path):
    """ThreadSanitizer sees every shared-memory access between barriers; a missing __syncthreads() shows up here."""
    probe = tmp_path / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    if compile_cpp([probe], tmp_path / "probe", "-fsanitize=thread").returncode != 0:
        pytest.skip("this C++ compiler has no ThreadSanitizer")
    driver = tmp_path / "driver.cpp"
    driver.write_text(RACE_DRIVER)
    binary = tmp_path / "race_check"
    built = compile_cpp([driver, CUDA_DIR / "wkv7_emulate.cpp"], binary, "-O1", "-g", "-fsanitize=thread")
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[:3000]
    assert run.returncode == 0, run.stderr[-2000:]


NVCC = shutil.which("nvcc")
PTXAS_ENTRY = re.compile(r"Compiling entry function '_ZN4wkv7\d+(\w+?_kernel)I(\w+?)E\w*' for '(sm_\d+)'")
PTXAS_USAGE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


@pytest.mark.gpu  # runs with the GPU tests: CI machines have no nvcc
@pytest.mark.skipif(NVCC is None, reason="needs nvcc (no GPU needed)")
def test_cuda_kernels_fit_in_registers_without_spills(tmp_path):
    """ptxas's own report for Ampere and Hopper: every kernel under the 255-register limit, no spill traffic."""
    built = subprocess.run([NVCC, "-c", "-O3", "--use_fast_math", "-Xptxas", "-v", f"-I{CUDA_DIR}",
                            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                            str(CUDA_DIR / "wkv7.cu"), "-o", str(tmp_path / "wkv7.o")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    report = {}
    for entry in PTXAS_ENTRY.finditer(built.stderr):
        stores, loads, registers = PTXAS_USAGE.search(built.stderr, entry.end()).groups()
        report[entry.groups()] = (int(registers), int(stores) + int(loads))
    kernels = {(kernel, arch) for kernel, _, arch in report}
    assert kernels == {(k, arch) for k in ("forward_kernel", "backward_kernel") for arch in ("sm_80", "sm_90")}
    assert len(report) == 8, report  # fp32 and bf16 each
    for name, (registers, spilled) in report.items():
        assert registers < 255 and spilled == 0, (name, registers, spilled)


# ---- errors and the FLA wrapper, without a GPU --------------------------------------------------------------

def test_cuda_op_refuses_cpu_tensors_and_other_head_sizes_in_one_line():
    with pytest.raises(UserError, match=r"^WKV op 'cuda' needs CUDA tensors, got a tensor on cpu; use op 'torch'"):
        wkv7(*wkv7_inputs(1, 3, 1, 64), op="cuda")
    with pytest.raises(UserError, match=r"^WKV op 'cuda' supports head size 64 only, got 32"):
        wkv7(*wkv7_inputs(1, 3, 1, 32), op="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_extension_without_cuda_says_so_in_one_line():
    from rwkvray.kernels.wkv7_cuda import extension
    with pytest.raises(UserError) as error:
        extension()
    assert str(error.value) == ("WKV op 'cuda' needs an NVIDIA GPU and a CUDA build of PyTorch; "
                                "use op 'torch' or 'fla'")


def test_build_failure_reports_the_compilers_first_error():
    log = ("Error building extension 'rwkvray_wkv7_x': [1/3] nvcc -c wkv7.cu\n"
           "FAILED: wkv7.cuda.o\n"
           "wkv7_kernels.cuh(12): error: identifier \"nope\" is undefined\n"
           "2 errors detected\n")
    assert first_error_line(RuntimeError(log)) == 'wkv7_kernels.cuh(12): error: identifier "nope" is undefined'
    assert first_error_line(RuntimeError("ninja: not found")) == "ninja: not found"


def fake_chunk_rwkv7(r, w, k, v, a, b, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, safe_gate=False, chunk_size=None, lower_bound=None):
    """FLA 0.6.0's documented contract: w is the log-decay, states are [B,H,K,V]."""
    assert scale == 1.0 and output_final_state and safe_gate
    assert lower_bound is not None and (w >= lower_bound).all() and (w < 0).all()
    y, state = wkv7_loop(r, torch.log(-w), k, v, a, b, initial_state.transpose(-1, -2))
    return y, state.transpose(-1, -2)


def install_fake_fla(monkeypatch, chunk_rwkv7):
    module = types.ModuleType("fla.ops.rwkv7")
    module.chunk_rwkv7 = chunk_rwkv7
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.rwkv7", module)


@pytest.fixture
def fla_cache():
    wkv7_fla.fla_kernel.cache_clear()
    wkv7_fla.checked_kernel.cache_clear()
    yield
    wkv7_fla.fla_kernel.cache_clear()
    wkv7_fla.checked_kernel.cache_clear()


def test_fla_wrapper_converts_decay_and_state_layout_both_ways(monkeypatch, fla_cache):
    install_fake_fla(monkeypatch, fake_chunk_rwkv7)
    inputs = [x.float().requires_grad_() for x in wkv7_inputs(2, 9, 2, 64, seed=4)]
    ref_inputs = [x.double().detach().requires_grad_() for x in inputs]
    y_ref, s_ref = wkv7_loop(*ref_inputs)
    y, s = wkv7(*inputs, op="fla")
    assert y.dtype == s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))  # not symmetric: catches a transpose
    ds0 = torch.autograd.grad((s * weight).sum(), inputs[6])[0]
    ds0_ref = torch.autograd.grad((s_ref * weight.double()).sum(), ref_inputs[6])[0]
    assert rel_err(ds0, ds0_ref) < 1e-5


def test_fla_wrapper_asks_old_releases_for_batch_first_layout(monkeypatch, fla_cache):
    def old_chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=True,
                        cu_seqlens=None, head_first=True):
        assert head_first is False and scale == 1.0
        y, state = wkv7_loop(r, torch.log(-w), k, v, a, b, initial_state.transpose(-1, -2))
        return y, state.transpose(-1, -2)

    install_fake_fla(monkeypatch, old_chunk_rwkv7)
    inputs = wkv7_inputs(1, 3, 2, 64)
    y, s = wkv7(*(x.float() for x in inputs), op="fla")
    y_ref, s_ref = wkv7_loop(*inputs)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-6


def test_fla_is_called_by_keyword_so_a_fork_with_its_own_order_still_works(monkeypatch, fla_cache):
    """rwkv-fla's order r, k, v, w, a, b with the same names: keywords land each tensor where it belongs."""
    def reordered(r, k, v, w, a, b, scale=1.0, initial_state=None, output_final_state=False, safe_gate=False,
                  lower_bound=None):
        return fake_chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, None, safe_gate,
                                None, lower_bound)

    install_fake_fla(monkeypatch, reordered)
    inputs = wkv7_inputs(2, 5, 2, 64, seed=2)
    y, s = wkv7(*(x.float() for x in inputs), op="fla")
    y_ref, s_ref = wkv7_loop(*inputs)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-6


def test_fla_fork_that_swaps_arguments_under_our_names_is_refused(monkeypatch, fla_cache):
    """A fork that declares r, w, k, v, a, b but reads k as the value and v as the key: the signature passes,
    the first-use self-check does not."""
    def swapped(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, safe_gate=False,
                lower_bound=None):
        y, state = wkv7_loop(r, torch.log(-w), v, k, a, b, initial_state.transpose(-1, -2))
        return y, state.transpose(-1, -2)

    install_fake_fla(monkeypatch, swapped)
    with pytest.raises(UserError) as error:
        wkv7(*(x.float() for x in wkv7_inputs(1, 4, 1, 64)), op="fla")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("fla ")
    assert "chunk_rwkv7 does not reproduce the RWKV-7 recurrence on a tiny self-check" in message
    assert message.endswith("(rwkv-fla orders them r, k, v, w, a, b); install fla-core>=0.6.0")


def test_fla_wrapper_refuses_a_chunk_rwkv7_without_initial_state(monkeypatch, fla_cache):
    install_fake_fla(monkeypatch, lambda r, w, k, v, a, b, scale=1.0: (r, None))
    with pytest.raises(UserError, match=r"has a chunk_rwkv7 without initial_state, output_final_state; "
                                        r"install fla-core>=0.6.0$"):
        wkv7(*wkv7_inputs(1, 2, 1, 64), op="fla")


def test_fla_missing_is_one_clear_line(monkeypatch, fla_cache):
    for name in ("fla", "fla.ops", "fla.ops.rwkv7"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r"^WKV op 'fla' needs flash-linear-attention \(pip install fla-core>=0.6.0\)"):
        wkv7(*wkv7_inputs(1, 2, 1, 64), op="fla")


# ---- on a GPU -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 15, 16, 100, 1024])
def test_cuda_op_matches_float64_loop(dtype, B, T):
    run_backend_against_loop("cuda", dtype, B, T)


@pytest.mark.gpu
@needs_fla
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 15, 16, 100, 1024])
def test_fla_op_matches_float64_loop(B, T):
    run_backend_against_loop("fla", torch.bfloat16, B, T)


def run_backend_against_loop(op, dtype, B, T):
    xs, dy, ds, reference = case(B, T, 4, dtype, device="cuda", seed=T)
    xs = [x.requires_grad_() for x in xs]
    y, s = wkv7(*xs, op=op)
    assert y.dtype == dtype and s.dtype == torch.float32 and s.shape == (B, 4, 64, 64)
    grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), xs)
    assert grads[6].dtype == torch.float32
    assert_close_to_reference([y, s, *grads], reference, GPU_BOUND[dtype], NAMES)


@pytest.mark.gpu
def test_cuda_op_without_grad_gives_the_same_outputs():
    xs, _, _, _ = case(2, 50, 2, torch.bfloat16, device="cuda")
    with torch.no_grad():
        y_lean, s_lean = wkv7(*xs, op="cuda")
    y, s = wkv7(*[x.requires_grad_() for x in xs], op="cuda")
    assert torch.equal(y.detach(), y_lean) and torch.equal(s.detach(), s_lean)


@pytest.mark.gpu
def test_state_tuning_step_agrees_across_ops():
    """Loss and time_state gradient of a tiny bf16 model, as in training: torch's op is the reference."""
    from rwkvray.model.loss import masked_lm_loss
    from rwkvray.peft.state import from_time_state
    from tests.helpers import TINY, random_model

    g = torch.Generator().manual_seed(3)
    B, T = 2, 40
    idx = torch.randint(0, TINY.vocab_size, (B, T + 1), generator=g).cuda()
    mask = (torch.rand(B, T, generator=g) > 0.3).cuda()
    time_state = (torch.randn(TINY.n_layer, *TINY.state_shape, generator=g) * 0.1).cuda().requires_grad_()

    results = {}
    ops = ["torch", "cuda"] + (["fla"] if importlib.util.find_spec("fla") else [])
    for op in ops:
        model = random_model(dtype=torch.bfloat16, op=op).cuda().requires_grad_(False)
        state = from_time_state(time_state, B, TINY.n_embd, dtype=torch.bfloat16)
        hidden = model.features(idx[:, :-1], state)
        loss = masked_lm_loss(hidden, model.head, idx[:, 1:], mask)
        results[op] = (loss.item(), torch.autograd.grad(loss, time_state)[0])

    loss_ref, grad_ref = results["torch"]
    assert grad_ref.abs().max() > 0
    for op in ops[1:]:
        loss, grad = results[op]
        assert abs(loss - loss_ref) / abs(loss_ref) < 1e-2, (op, loss, loss_ref)
        assert rel_err(grad, grad_ref) < 3e-2, (op, rel_err(grad, grad_ref))


def test_interpreter_mends_name_the_pins_when_versions_differ(monkeypatch):
    """Another triton (or none) must skip the FLA interpreter tests with this reason, not run half-mended."""
    from tests import triton_interp
    found = {"triton": "3.9.0", "fla-core": None}
    monkeypatch.setattr(triton_interp, "installed", found.get)
    assert triton_interp.version_mismatch() == ("the Triton interpreter mends are written for triton==3.7.1, "
                                                "fla-core==0.6.0; found triton 3.9.0, fla-core missing")
    found.update({"triton": "3.7.1", "fla-core": "0.6.0"})
    assert triton_interp.version_mismatch() is None
