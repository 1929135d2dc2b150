"""FLA's real `chunk_rwkv7` behind op="fla", against the float64 loop; on the CPU through Triton's interpreter.

The `triton_interpreter` fixture (tests/triton_interp.py) runs the kernels compiled on a GPU and interpreted
otherwise. Everything here is fp32: the interpreter of triton 3.7.1 cannot run bf16 (its builder has no
`get_bf16`), so bf16 is checked only on a GPU (tests/test_gpu_kernels.py). Under the interpreter `tl.dot` is an
exact fp32 matmul, so the bound is tight; on a GPU TF32 rounding needs the looser one.
"""
import pytest
import torch

from rwkvray.kernels import wkv7
from rwkvray.kernels import wkv7_fla
from tests.test_gpu_kernels import NAMES, case, rel_err

BOUND = 1e-4 if not torch.cuda.is_available() else 1e-2  # TF32 tensor cores on a GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def installed_fla(triton_interpreter):
    """FLA as installed, self-checked afresh: no fake from test_gpu_kernels.py may stay cached."""
    wkv7_fla.fla_kernel.cache_clear()
    wkv7_fla.checked_kernel.cache_clear()


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("T", [1, 15, 16, 64, 100])
def test_fla_op_matches_float64_loop_with_every_gradient(B, T):
    xs, dy, ds, reference = case(B, T, 2, torch.float32, device=DEVICE, seed=T)
    xs = [x.requires_grad_() for x in xs]
    y, s = wkv7(*xs, op="fla")
    assert y.dtype == s.dtype == torch.float32 and s.shape == (B, 2, 64, 64)
    grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), xs)
    for name, got, ref in zip(["y", "state"] + ["d" + n for n in NAMES], [y, s, *grads], reference):
        assert ref.abs().max() > 0, name
        assert rel_err(got, ref) < BOUND, f"{name}: relative error {rel_err(got, ref):.2e}"


def test_model_forward_backward_agrees_with_torch_op():
    """A tiny fp32 model from a tuned state: loss and the state's gradient, op="fla" against op="torch"; also in
    chunks of 8 tokens (--train_type infctx), where FLA's final-state gradient carries it back across chunks."""
    from rwkvray.model.long_context import Chunking, chunked_lm_loss
    from rwkvray.model.loss import masked_lm_loss
    from rwkvray.peft.state import from_time_state
    from tests.helpers import TINY, random_model

    g = torch.Generator().manual_seed(3)
    B, T = 2, 20
    idx = torch.randint(0, TINY.vocab_size, (B, T + 1), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(DEVICE)
    time_state = (torch.randn(TINY.n_layer, *TINY.state_shape, generator=g) * 0.1).to(DEVICE).requires_grad_()
    results = {}
    for op, chunking in (("torch", None), ("fla", None), ("fla", Chunking(8))):
        model = random_model(op=op).to(DEVICE).requires_grad_(False)
        state = from_time_state(time_state, B, TINY.n_embd)
        if chunking:
            loss = chunked_lm_loss(model, idx[:, :-1], idx[:, 1:], mask, state, chunking)
        else:
            loss = masked_lm_loss(model.features(idx[:, :-1], state), model.head, idx[:, 1:], mask)
        results[op, chunking] = (loss.item(), torch.autograd.grad(loss, time_state)[0])
    loss_ref, grad_ref = results.pop(("torch", None))
    assert grad_ref.abs().max() > 0
    for loss, grad in results.values():
        assert abs(loss - loss_ref) / abs(loss_ref) < 1e-5, (loss, loss_ref)
        assert rel_err(grad, grad_ref) < BOUND, rel_err(grad, grad_ref)
