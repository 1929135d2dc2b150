"""WKV-6 torch op (chunked) against the float64 loop: output, final state and every gradient, ds0 included."""
import pytest
import torch

from rwkvray.kernels import wkv6
from rwkvray.kernels.wkv6_torch import wkv6_loop


def wkv6_inputs(B, T, H, N, seed=0, dtype=torch.float64, decay_floor=-8.0, decay_ceiling=2.0):
    """Random inputs; w spans decays from ~1 (w=-8) to ~0 (w=2: exp(-e^2) = 6e-4), as RWKV-6 allows."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    r, k, v = rand(B, T, H, N), rand(B, T, H, N) * 0.5, rand(B, T, H, N)
    w = decay_floor + (decay_ceiling - decay_floor) * torch.rand(B, T, H, N, generator=g, dtype=dtype)
    u = rand(H, N) * 0.5
    s0 = rand(B, H, N, N) * 0.3
    return [r, w, k, v, u, s0]


@pytest.mark.parametrize("B,T", [(1, 1), (3, 15), (2, 16), (2, 100)])
def test_torch_op_matches_float64_loop(B, T):
    inputs = wkv6_inputs(B, T, 2, 64)
    y_ref, s_ref = wkv6_loop(*inputs)
    y, s = wkv6(*inputs, op="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_torch_op_gradients_match_loop_for_every_input():
    inputs = [x.requires_grad_() for x in wkv6_inputs(2, 37, 2, 64)]
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(2, 37, 2, 64, generator=g, dtype=torch.float64)
    ds = torch.randn(2, 2, 64, 64, generator=g, dtype=torch.float64)
    grads = []
    for fn in (wkv6_loop, lambda *x: wkv6(*x, op="torch")):
        y, s = fn(*inputs)
        grads.append(torch.autograd.grad((y * dy).sum() + (s * ds).sum(), inputs))
    for name, ref, got in zip("r w k v u s0".split(), *grads):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9, msg=name)


def test_torch_op_gradcheck():
    inputs = [x.requires_grad_() for x in wkv6_inputs(1, 18, 1, 2, seed=3)]  # crosses a chunk boundary
    assert torch.autograd.gradcheck(lambda *x: wkv6(*x, op="torch"), inputs)


@pytest.mark.parametrize("floor,ceiling", [(-8.0, 2.0), (4.0, 6.0)])
def test_fp32_chunked_relative_error_against_float64(floor, ceiling):
    """Also with decays that underflow to exactly 0 in fp32 (w >= 4): nothing divides by them."""
    inputs = wkv6_inputs(2, 200, 2, 64, seed=7, decay_floor=floor, decay_ceiling=ceiling)
    y_ref, s_ref = wkv6_loop(*inputs)
    y, s = wkv6(*(x.float() for x in inputs), op="torch")
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5
    assert (s.double() - s_ref).abs().max() / s_ref.abs().max() < 1e-5
    assert s.dtype == torch.float32 and torch.isfinite(y).all()


def test_fp32_state_gradient_against_float64():
    inputs = wkv6_inputs(1, 64, 2, 64, seed=9)
    s0 = inputs[-1].float().requires_grad_()
    y, s = wkv6(*(x.float() for x in inputs[:-1]), s0, op="torch")
    (y.sum() + s.sum()).backward()
    s0_ref = inputs[-1].clone().requires_grad_()
    y_ref, s_ref = wkv6_loop(*inputs[:-1], s0_ref)
    (y_ref.sum() + s_ref.sum()).backward()
    assert (s0.grad.double() - s0_ref.grad).abs().max() / s0_ref.grad.abs().max() < 1e-5


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="unknown WKV op 'triton'"):
        wkv6(*wkv6_inputs(1, 2, 1, 4), op="triton")
