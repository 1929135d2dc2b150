import pytest
import torch

from rwkvray.model.rwkv7 import RNNState
from rwkvray.peft.state import from_time_state
from rwkvray.serve.slot_pool import state_rows
from tests.helpers import TINY, assert_parallel_equals_rnn, random_model


def random_state(batch, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    L, C = TINY.n_layer, TINY.n_embd
    return RNNState(
        att_shift=torch.randn(L, batch, C, generator=g, dtype=dtype),
        wkv=torch.randn(L, batch, *TINY.state_shape, generator=g, dtype=dtype) * 0.5,
        ffn_shift=torch.randn(L, batch, C, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("T", [1, 15, 37])
def test_parallel_mode_equals_rnn_mode(T):
    model = random_model(dtype=torch.float64)
    B = 3
    idx = torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(T))
    state = random_state(B)
    assert_parallel_equals_rnn(model, idx, state)


def test_fp32_parallel_matches_fp64():
    model64 = random_model(dtype=torch.float64)
    model32 = random_model(dtype=torch.float32)
    idx = torch.randint(0, TINY.vocab_size, (2, 40))
    with torch.no_grad():
        ref, _ = model64(idx, random_state(2))
        state = random_state(2)
        out, _ = model32(idx, RNNState(*(t.float() for t in (state.att_shift, state.wkv, state.ffn_shift))))
    rel = (out.double() - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5


def test_initial_state_changes_logits_and_rows_are_independent():
    model = random_model(dtype=torch.float64)
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        zero_logits, _ = model(idx)
        state = random_state(2)
        tuned_logits, _ = model(idx, state)
        row1_alone, _ = model(idx[1:], state_rows(state, slice(1, 2)))
    assert (tuned_logits - zero_logits).abs().max() > 1e-2
    torch.testing.assert_close(row1_alone, tuned_logits[1:], rtol=1e-10, atol=1e-10)


def test_grad_checkpointing_gives_the_same_state_gradient():
    idx = torch.randint(0, TINY.vocab_size, (2, 33))
    grads = []
    for grad_cp in (False, True):
        model = random_model(grad_cp=grad_cp)
        s0 = torch.zeros(TINY.n_layer, *TINY.state_shape, requires_grad=True)
        logits, _ = model(idx, from_time_state(s0, 2, TINY.n_embd))
        logits.logsumexp(-1).mean().backward()
        grads.append(s0.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_chunked_loss_equals_full_cross_entropy(monkeypatch):
    import rwkvray.model.loss as loss_mod
    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", 7)
    model = random_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    targets = torch.randint(0, TINY.vocab_size, (2, 20))
    mask = (torch.rand(2, 20) > 0.3).float()
    s0 = torch.zeros(TINY.n_layer, *TINY.state_shape, requires_grad=True)
    hidden, _ = model.hidden(idx, from_time_state(s0, 2, TINY.n_embd))
    chunked = loss_mod.masked_lm_loss(hidden, model.head, targets, mask)
    full = (torch.nn.functional.cross_entropy(model.head(hidden).flatten(0, 1), targets.flatten(), reduction="none") * mask.flatten()).sum() / mask.sum()
    torch.testing.assert_close(chunked, full)
    (g_chunked,) = torch.autograd.grad(chunked, s0, retain_graph=True)
    (g_full,) = torch.autograd.grad(full, s0)
    torch.testing.assert_close(g_chunked, g_full)


def test_training_features_are_the_inference_features_without_the_state():
    model = random_model(dtype=torch.float64)
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    state = random_state(2)
    with torch.no_grad():
        features = model.features(idx, state)
        hidden, _ = model.hidden(idx, state)
    assert isinstance(features, torch.Tensor)
    torch.testing.assert_close(features, hidden, rtol=0, atol=0)
