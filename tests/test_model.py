"""The model, for each version: parallel mode against RNN mode, precision, recompute, the chunked loss; RWKV-6
also against the `rwkv` pip package, and its checkpoint loading."""
import pytest
import torch

from rwkvray.cli import main
from rwkvray.errors import UserError
from rwkvray.model.checkpoint import load_checkpoint, save_checkpoint
from rwkvray.model.init import default_dims_x060, init_weights
from rwkvray.model.rwkv import RNNState, RWKV, load_model
from rwkvray.peft.state import from_time_state
from rwkvray.engine.slot_pool import state_rows
from tests.helpers import TINY, TINY_X060, assert_parallel_equals_rnn, random_model

VERSIONS = pytest.mark.parametrize("dims", [TINY, TINY_X060], ids=lambda dims: dims.version)


def random_state(dims, batch, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    L, C = dims.n_layer, dims.n_embd
    return RNNState(
        att_shift=torch.randn(L, batch, C, generator=g, dtype=dtype),
        wkv=torch.randn(L, batch, *dims.state_shape, generator=g, dtype=dtype) * 0.5,
        ffn_shift=torch.randn(L, batch, C, generator=g, dtype=dtype),
    )


@VERSIONS
@pytest.mark.parametrize("T", [1, 19, 37])
def test_parallel_mode_equals_rnn_mode(dims, T):
    model = random_model(dims, dtype=torch.float64)
    B = 3
    idx = torch.randint(0, dims.vocab_size, (B, T), generator=torch.Generator().manual_seed(T))
    assert_parallel_equals_rnn(model, idx, random_state(dims, B, seed=T))


@VERSIONS
def test_fp32_parallel_matches_fp64(dims):
    model64 = random_model(dims, dtype=torch.float64)
    model32 = random_model(dims, dtype=torch.float32)
    idx = torch.randint(0, dims.vocab_size, (2, 40))
    with torch.no_grad():
        ref, _ = model64(idx, random_state(dims, 2))
        state = random_state(dims, 2)
        out, _ = model32(idx, RNNState(*(t.float() for t in (state.att_shift, state.wkv, state.ffn_shift))))
    rel = (out.double() - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5


@VERSIONS
def test_initial_state_changes_logits_and_rows_are_independent(dims):
    model = random_model(dims, dtype=torch.float64)
    idx = torch.randint(0, dims.vocab_size, (2, 20))
    with torch.no_grad():
        zero_logits, _ = model(idx)
        state = random_state(dims, 2)
        tuned_logits, _ = model(idx, state)
        row1_alone, _ = model(idx[1:], state_rows(state, slice(1, 2)))
    assert (tuned_logits - zero_logits).abs().max() > 1e-2
    torch.testing.assert_close(row1_alone, tuned_logits[1:], rtol=1e-10, atol=1e-10)


@VERSIONS
def test_grad_checkpointing_gives_the_same_state_gradient(dims):
    idx = torch.randint(0, dims.vocab_size, (2, 33))
    grads = []
    for grad_cp in (False, True):
        model = random_model(dims, grad_cp=grad_cp)
        s0 = torch.zeros(dims.n_layer, *dims.state_shape, requires_grad=True)
        logits, _ = model(idx, from_time_state(s0, 2, dims.n_embd))
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


@VERSIONS
def test_training_features_are_the_inference_features_without_the_state(dims):
    model = random_model(dims, dtype=torch.float64)
    idx = torch.randint(0, dims.vocab_size, (2, 20))
    state = random_state(dims, 2)
    with torch.no_grad():
        features = model.features(idx, state)
        hidden, _ = model.hidden(idx, state)
    assert isinstance(features, torch.Tensor)
    torch.testing.assert_close(features, hidden, rtol=0, atol=0)


# ---------------------------------------------------------------- RWKV-6 against the `rwkv` package, its files


@pytest.fixture(scope="module")
def rwkv_package():
    """The `rwkv` pip package's RWKV class on its plain torch path (it reads these switches when imported)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RWKV_JIT_ON", "0")
        env.setenv("RWKV_CUDA_ON", "0")
        env.delenv("RWKV_V7_ON", raising=False)
        from rwkv.model import RWKV as PackageRWKV
        yield PackageRWKV


def random_checkpoint_x060(tmp_path, seed=0) -> str:
    path = str(tmp_path / f"x060-{seed}.pth")
    save_checkpoint(random_model(TINY_X060, seed=seed).state_dict(), path)
    return path


def relative_error(ours, ref):
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def test_x060_logits_equal_the_rwkv_package(tmp_path, rwkv_package):
    path = random_checkpoint_x060(tmp_path)
    tokens = torch.randint(0, TINY_X060.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    model, merged = load_model(path)
    assert isinstance(model, RWKV) and merged is None and model.dims == TINY_X060
    with torch.no_grad():
        ours, _ = model(torch.tensor([tokens]))
    reference = rwkv_package(path.removesuffix(".pth"), strategy="cpu fp32")
    theirs, _ = reference.forward(tokens, None, full_output=True)
    assert relative_error(ours[0], theirs) < 1e-4
    # and token by token, carrying the package's state
    state, rnn = None, []
    for token in tokens[:8]:
        logits, state = reference.forward([token], state)
        rnn.append(logits)
    assert relative_error(ours[0, :8], torch.stack(rnn)) < 1e-4


def test_x060_merged_state_is_read_as_the_rwkv_package_reads_it(tmp_path, rwkv_package):
    """The package loads blocks.{i}.att.time_state with .transpose(1, 2): the file holds [value, key], ours too."""
    base = random_model(TINY_X060, seed=2)
    time_state = torch.randn(TINY_X060.n_layer, *TINY_X060.state_shape, generator=torch.Generator().manual_seed(3))
    path = str(tmp_path / "merged.pth")
    save_checkpoint({**base.state_dict(), **{f"blocks.{i}.att.time_state": s for i, s in enumerate(time_state)}}, path)
    tokens = [5, 17, 200, 3, 99, 42, 7, 1, 250, 18]
    model, merged = load_model(path)
    torch.testing.assert_close(merged, time_state)
    with torch.no_grad():
        ours, _ = model(torch.tensor([tokens]), from_time_state(merged, 1, TINY_X060.n_embd))
        untuned, _ = model(torch.tensor([tokens]))
    theirs, _ = rwkv_package(path.removesuffix(".pth"), strategy="cpu fp32").forward(tokens, None, full_output=True)
    assert relative_error(ours[0], theirs) < 1e-4
    assert relative_error(untuned[0], theirs) > 1e-2  # the state matters, so a transposed one would fail


def test_init_model_x060_writes_rwkv_lm_keys_and_dims(tmp_path, capsys):
    path = str(tmp_path / "new.pth")
    assert main(["init-model", "--version", "x060", "--n-layer", "2", "--n-embd", "256", "--vocab-size", "1000",
                 "--out", path]) == 0
    assert capsys.readouterr().out == (f"wrote {path}: x060, n_layer 2, n_embd 256, vocab 1000, "
                                       "ffn 896, low-rank mix/decay 32/64\n")
    dims = default_dims_x060(2, 256, vocab_size=1000)
    assert load_checkpoint(path).dims == dims
    weights = torch.load(path, weights_only=True)
    assert list(weights) == list(init_weights(dims))  # RWKV-LM's state-dict order
    assert weights["blocks.0.att.time_maa_w2"].shape == (5, 32, 256)
    assert weights["blocks.1.att.time_faaaa"].shape == (4, 64)
    assert weights["blocks.0.att.time_decay"][0, 0, 0].item() == pytest.approx(-6.0)
    assert weights["blocks.1.att.time_decay"][0, 0, -1].item() == pytest.approx(-1.0)
    for zero in ("att.output.weight", "ffn.value.weight", "ffn.receptance.weight", "att.time_maa_w1"):
        assert not weights[f"blocks.1.{zero}"].any()
    assert weights["blocks.0.att.ln_x.weight"][0].item() == pytest.approx(0.5 ** 0.7)


def test_mismatched_and_truncated_x060_files_are_refused(tmp_path):
    weights = random_model(TINY_X060).state_dict()
    bad = dict(weights)
    bad["blocks.1.att.time_faaaa"] = torch.zeros(4, 32)
    path = str(tmp_path / "bad.pth")
    save_checkpoint(bad, path)
    with pytest.raises(UserError, match=r"key 'blocks.1.att.time_faaaa' has shape \[4, 32\], expected \[2, 64\]$"):
        load_checkpoint(path)
    del bad["blocks.1.att.time_faaaa"], bad["blocks.1.ffn.value.weight"]
    save_checkpoint(bad, path)
    with pytest.raises(UserError, match=r"missing key 'blocks.1.att.time_faaaa'$"):
        load_checkpoint(path)
    save_checkpoint({**weights, "blocks.0.att.r_k": torch.zeros(2, 64)}, path)
    with pytest.raises(UserError, match=r"unexpected key 'blocks.0.att.r_k' \(not part of an RWKV-6 x060 checkpoint\)"):
        load_checkpoint(path)
    with open(path, "r+b") as f:
        f.truncate(2000)
    with pytest.raises(UserError, match=r"not a PyTorch checkpoint"):
        load_checkpoint(path)
