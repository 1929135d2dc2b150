"""The WKV torch op (chunked) of each version against its float64 loop: output, final state and every gradient,
ds0 included."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from rwkvray.kernels import resolve_op, wkv6, wkv7
from rwkvray.kernels.wkv6_torch import wkv6_loop
from rwkvray.kernels.wkv7_torch import wkv7_loop
from tests.helpers import wkv6_inputs, wkv7_inputs


@dataclass(frozen=True)
class Kernel:
    op: Callable       # the façade: wkv7 or wkv6
    loop: Callable     # the float64 reference recurrence
    inputs: Callable   # random inputs (B, T, H, N, seed=...)
    names: str         # the inputs' names, for messages


KERNELS = {"wkv7": Kernel(wkv7, wkv7_loop, wkv7_inputs, "r w k v a b s0"),
           "wkv6": Kernel(wkv6, wkv6_loop, wkv6_inputs, "r w k v u s0")}
EACH = pytest.mark.parametrize("kernel", list(KERNELS.values()), ids=list(KERNELS))


@EACH
@pytest.mark.parametrize("B,T", [(1, 1), (3, 15), (2, 16), (2, 100)])
def test_torch_op_matches_float64_loop(kernel, B, T):
    inputs = kernel.inputs(B, T, 2, 64)
    y_ref, s_ref = kernel.loop(*inputs)
    y, s = kernel.op(*inputs, op="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


@EACH
def test_torch_op_gradients_match_loop_for_every_input(kernel):
    inputs = [x.requires_grad_() for x in kernel.inputs(2, 37, 2, 64)]
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(2, 37, 2, 64, generator=g, dtype=torch.float64)
    ds = torch.randn(2, 2, 64, 64, generator=g, dtype=torch.float64)
    grads = []
    for fn in (kernel.loop, lambda *x: kernel.op(*x, op="torch")):
        y, s = fn(*inputs)
        grads.append(torch.autograd.grad((y * dy).sum() + (s * ds).sum(), inputs))
    for name, ref, got in zip(kernel.names.split(), *grads):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9, msg=name)


@EACH
def test_torch_op_gradcheck(kernel):
    inputs = [x.requires_grad_() for x in kernel.inputs(1, 18, 1, 4, seed=3)]  # crosses a chunk boundary
    assert torch.autograd.gradcheck(lambda *x: kernel.op(*x, op="torch"), inputs)


@EACH
def test_fp32_chunked_relative_error_against_float64(kernel):
    inputs = kernel.inputs(2, 200, 2, 64, seed=7)
    y_ref, s_ref = kernel.loop(*inputs)
    y, s = kernel.op(*(x.float() for x in inputs), op="torch")
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5
    assert (s.double() - s_ref).abs().max() / s_ref.abs().max() < 1e-5
    assert s.dtype == torch.float32 and torch.isfinite(y).all()


def test_wkv6_fp32_with_decays_that_underflow_to_zero():
    """RWKV-6's decay is unclamped: with w >= 4 it is exactly 0 in fp32, and nothing may divide by it."""
    inputs = wkv6_inputs(2, 200, 2, 64, seed=7, decay_floor=4.0, decay_ceiling=6.0)
    y_ref, s_ref = wkv6_loop(*inputs)
    y, s = wkv6(*(x.float() for x in inputs), op="torch")
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5
    assert (s.double() - s_ref).abs().max() / s_ref.abs().max() < 1e-5
    assert torch.isfinite(y).all()


@EACH
def test_fp32_state_gradient_against_float64(kernel):
    inputs = kernel.inputs(1, 64, 2, 64, seed=9)
    s0 = inputs[-1].float().requires_grad_()
    y, s = kernel.op(*(x.float() for x in inputs[:-1]), s0, op="torch")
    (y.sum() + s.sum()).backward()
    s0_ref = inputs[-1].clone().requires_grad_()
    y_ref, s_ref = kernel.loop(*inputs[:-1], s0_ref)
    (y_ref.sum() + s_ref.sum()).backward()
    assert (s0.grad.double() - s0_ref.grad).abs().max() / s0_ref.grad.abs().max() < 1e-5


@EACH
def test_unknown_op_is_refused(kernel):
    with pytest.raises(ValueError, match="unknown WKV op 'triton'"):
        kernel.op(*kernel.inputs(1, 2, 1, 4), op="triton")


def test_auto_picks_torch_on_cpu():
    assert resolve_op("auto", torch.device("cpu")) == "torch"
