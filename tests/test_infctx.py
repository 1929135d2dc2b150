"""Long documents in chunks (`--train_type infctx`): the chunked loss and gradients equal the unchunked ones, the
detached switch is RWKV-PEFT's truncated gradient, memory is bounded by the chunk, and a 2-worker run trains."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvray.model.long_context import Chunking, chunked_lm_loss
from rwkvray.model.loss import masked_lm_loss
from rwkvray.model.rwkv import RNNState
from rwkvray.model.tuned_state import TunedState
from rwkvray.peft.base import PeftModel
from rwkvray.peft.state import StateTuning
from rwkvray.errors import UserError
from tests.helpers import TINY, TINY_X060, random_model
from tests.test_config import MD, load_text

ROOT = Path(__file__).resolve().parents[1]
T, CHUNK = 40, 16  # three chunks, the last one shorter


def batch_and_state(dims, seed=0):
    """Two rows with a partial mask, and a random float64 initial state (all three tensors) that needs grad."""
    torch.manual_seed(seed + 1)
    idx = torch.randint(0, dims.vocab_size, (2, T + 1))
    mask = torch.ones(2, T, dtype=torch.float64)
    mask[0, :7] = 0
    mask[1, 25:] = 0
    zeros = RNNState.zeros(dims, 2, dtype=torch.float64)
    state = RNNState(*(torch.randn_like(t, dtype=torch.float64).mul_(0.3).requires_grad_()
                       for t in (zeros.att_shift, zeros.wkv, zeros.ffn_shift)))
    return (idx[:, :-1], idx[:, 1:], mask), state


@functools.cache
def loss_and_grads(dims, chunking: Chunking | None, tokens=T):
    """(Computed once per arguments.) The loss and its gradient with respect to the initial state's three tensors and every model weight."""
    model = random_model(dims, dtype=torch.float64)
    (idx, targets, mask), state = batch_and_state(dims)
    mask = mask.clone()
    mask[:, tokens:] = 0  # the loss of the first `tokens` only (the truncated gradient's reference)
    if chunking is None:
        loss = masked_lm_loss(model.features(idx, state), model.head, targets, mask)
    else:
        loss = chunked_lm_loss(model, idx, targets, mask, state, chunking)
    inputs = [state.att_shift, state.wkv, state.ffn_shift, *model.parameters()]
    return loss.detach(), torch.autograd.grad(loss, inputs, allow_unused=True)


def max_relative_difference(grads, reference) -> float:
    return max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, reference) if r is not None)


@pytest.mark.parametrize("dims", [TINY, TINY_X060], ids=["x070", "x060"])
def test_chunked_loss_and_gradients_equal_the_unchunked_in_float64(dims):
    loss, grads = loss_and_grads(dims, None)
    chunked_loss, chunked_grads = loss_and_grads(dims, Chunking(CHUNK))
    assert all(g.abs().max() > 0 for g in grads[:3])  # every state tensor has a gradient to compare
    assert abs(chunked_loss - loss) <= 1e-12 * abs(loss)
    assert max_relative_difference(chunked_grads, grads) < 1e-10


@pytest.mark.parametrize("dims", [TINY, TINY_X060], ids=["x070", "x060"])
def test_detached_chunks_give_rwkv_peft_truncated_state_gradient(dims):
    """RWKV-PEFT's infctx: the same loss, but the initial state learns from the first chunk only."""
    loss, grads = loss_and_grads(dims, None)
    detached_loss, detached_grads = loss_and_grads(dims, Chunking(CHUNK, detach_between=True))
    assert abs(detached_loss - loss) <= 1e-12 * abs(loss)
    assert max_relative_difference(detached_grads[:3], grads[:3]) > 1e-2
    # the first chunk's share of the loss alone: same weighting (the whole sequence's mask count), no later chunks
    (_, _, mask), _ = batch_and_state(dims)
    scale = mask[:, :CHUNK].sum() / mask.sum()
    _, first_chunk_grads = loss_and_grads(dims, None, tokens=CHUNK)
    truncated = [g * scale for g in first_chunk_grads[:3]]
    assert max_relative_difference(detached_grads[:3], truncated) < 1e-10


def test_state_tuning_model_in_chunks_gives_the_unchunked_loss_and_state_gradient():
    """The PeftModel path that trainer.chunk_ctx takes, in the training dtype (fp32)."""
    results = []
    for chunking in (None, Chunking(CHUNK)):
        start = TunedState(torch.randn(TINY.n_layer, *TINY.state_shape))
        model = PeftModel(random_model(TINY), [StateTuning(start)], chunking)
        (idx, targets, mask), _ = batch_and_state(TINY)
        loss = model(idx, targets, mask.float())
        loss.backward()
        results.append((loss.item(), model.methods[0].time_state.grad))
    (loss, grad), (chunked_loss, chunked_grad) = results
    assert chunked_loss == pytest.approx(loss, rel=1e-6)
    assert (chunked_grad - grad).abs().max() <= 1e-4 * grad.abs().max()


def test_peak_memory_at_4096_tokens_in_chunks_of_256_stays_near_that_of_256(tmp_path):
    """benchmarks/infctx_memory.py, each ctx_len in a fresh process (peak RSS): chunked, 16 times the tokens
    need at most 1.5 times the memory; unchunked they need more than twice as much (the measure sees it)."""
    out = tmp_path / "memory.json"
    run = subprocess.run([sys.executable, "benchmarks/infctx_memory.py", "--ctx-lens", "256,4096", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(row["ctx_len"], row["chunk_ctx"]): row["step_peak_mib"] for row in json.loads(out.read_text())["rows"]}
    assert rows.keys() == {(256, None), (4096, 256), (4096, None)}
    reference = rows[256, None]
    assert reference > 50  # the step's activations, well above the allocator's noise
    assert rows[4096, 256] <= 1.5 * reference
    assert rows[4096, None] > 2 * reference


@pytest.mark.parametrize("trainer,expected", [
    ("{chunk_ctx: 1024}", "trainer.chunk_ctx: must be ≤ ctx_len (512): each ctx_len sample runs in chunks of "
                          "chunk_ctx tokens (got 1024)"),
    ("{chunk_ctx: 0}", "trainer.chunk_ctx: must be ≥ 1"),
    ("{chunk_grad: detached}", "trainer.chunk_grad: is read only with chunk_ctx set (--train_type infctx)"),
    ("{chunk_ctx: 64, chunk_grad: cut}", "trainer.chunk_grad: must be one of through, detached (got 'cut')"),
], ids=["longer-than-ctx", "zero", "grad-without-chunks", "bad-grad"])
def test_bad_chunk_keys_are_one_line_errors(workdir, trainer, expected):
    with pytest.raises(UserError) as error:
        load_text(MD + f"trainer: {trainer}\n", workdir)
    assert str(error.value) == f"{workdir / 'job.yaml'}: {expected}"


def test_chunk_keys_in_a_spec(workdir):
    spec = load_text(MD.replace("data: {", "data: {ctx_len: 16384, ") + "trainer: {chunk_ctx: 256, chunk_grad: detached}\n",
                     workdir)
    assert (spec.data.ctx_len, spec.trainer.chunk_ctx, spec.trainer.chunk_grad) == (16384, 256, "detached")
