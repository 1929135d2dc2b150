import pytest
import torch
import torch.nn.functional as F

from rwkvray.kernels import resolve_op, wkv7
from rwkvray.kernels.wkv7_torch import wkv7_loop


def wkv_inputs(B, T, H, N, seed=0, dtype=torch.float64):
    """Random inputs in the ranges the model produces (decay clamp, unit-norm kk), and a non-zero s0."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    r, k, v = rand(B, T, H, N), rand(B, T, H, N) * 0.5, rand(B, T, H, N)
    w = -F.softplus(-2 * rand(B, T, H, N)) - 0.5
    kk = F.normalize(rand(B, T, H, N), dim=-1)
    a_gate = torch.sigmoid(rand(B, T, H, N))
    s0 = rand(B, H, N, N) * 0.3
    return [r, w, k, v, -kk, kk * a_gate, s0]


@pytest.mark.parametrize("B,T", [(1, 1), (3, 15), (2, 16), (2, 100)])
def test_torch_op_matches_float64_loop(B, T):
    inputs = wkv_inputs(B, T, 2, 64)
    y_ref, s_ref = wkv7_loop(*inputs)
    y, s = wkv7(*inputs, op="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_torch_op_gradients_match_loop_for_every_input():
    inputs = [x.requires_grad_() for x in wkv_inputs(2, 37, 2, 64)]
    g = torch.Generator().manual_seed(5)
    dy, ds = torch.randn(2, 37, 2, 64, generator=g, dtype=torch.float64), torch.randn(2, 2, 64, 64, generator=g, dtype=torch.float64)
    grads = []
    for fn in (wkv7_loop, lambda *x: wkv7(*x, op="torch")):
        y, s = fn(*inputs)
        grads.append(torch.autograd.grad((y * dy).sum() + (s * ds).sum(), inputs))
    for name, ref, got in zip("r w k v a b s0".split(), *grads):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9, msg=name)


def test_torch_op_gradcheck():
    inputs = [x.requires_grad_() for x in wkv_inputs(2, 19, 1, 4, seed=3)]
    assert torch.autograd.gradcheck(lambda *x: wkv7(*x, op="torch"), inputs)


def test_fp32_chunked_relative_error_against_float64():
    inputs = wkv_inputs(2, 200, 2, 64, seed=7)
    y_ref, s_ref = wkv7_loop(*inputs)
    y, s = wkv7(*(x.float() for x in inputs), op="torch")
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5
    assert (s.double() - s_ref).abs().max() / s_ref.abs().max() < 1e-5
    assert s.dtype == torch.float32


def test_auto_picks_torch_on_cpu_and_unknown_op_is_refused():
    assert resolve_op("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown WKV op 'triton'"):
        wkv7(*wkv_inputs(1, 2, 1, 4), op="triton")
