"""State tuning end to end in one process: loss falls, base frozen, files written, resume, batch gradients."""
import json
import os

import pytest
import torch

from rwkvray.checkpoint import load_checkpoint
from rwkvray.cli import main
from rwkvray.config import spec_from_dict
from rwkvray.model import RNNState, load_model
from rwkvray.loss import masked_lm_loss
from rwkvray.state_file import load_state
from rwkvray.train_loop import LocalContext, export_final_state, train

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model):
    return make_tiny_model(2, 256)


def make_spec(model_path, proj_dir, **overrides):
    data = {
        "model": {"path": model_path},
        "data": {"file": SAMPLE, "ctx_len": 64, "loss_mask": "qa"},
        "optim": {"lr_init": 0.1, "lr_final": 0.02, "warmup_steps": 2},
        "trainer": {"epoch_count": 2, "epoch_steps": 12, "micro_bsz": 4, "precision": "fp32", "op": "torch",
                    "seed": 3, "proj_dir": str(proj_dir)},
    }
    for block, values in overrides.items():
        data.setdefault(block, {}).update(values)
    return spec_from_dict(data, "test")


def read_metrics(proj_dir):
    with open(os.path.join(proj_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_state_tuning_lowers_loss_and_keeps_base_bit_identical(tiny_model, tmp_path):
    before = load_checkpoint(tiny_model).weights
    spec = make_spec(tiny_model, tmp_path)
    ctx = LocalContext(str(tmp_path))
    train(spec, ctx)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.8, (first, last)
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
    after = load_checkpoint(tiny_model).weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name in ("rwkv-0.pth", "rwkv-1.pth", "loss.png", "train_log.txt"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = export_final_state(spec, ctx.checkpoint_dir)
    assert torch.equal(load_state(final), load_state(str(tmp_path / "rwkv-1.pth")))


def test_state_file_has_rwkv_peft_layout_and_changes_generation(tiny_model, tmp_path, capsys):
    train(make_spec(tiny_model, tmp_path, trainer={"epoch_count": 1}), LocalContext(str(tmp_path)))
    raw = torch.load(tmp_path / "rwkv-0.pth", weights_only=True)
    assert sorted(raw) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert all(t.shape == (4, 64, 64) and t.dtype == torch.float32 for t in raw.values())
    assert raw["blocks.0.att.time_state"].abs().max() > 0
    outputs = []
    for extra in ([], ["--state", str(tmp_path / "rwkv-0.pth")]):
        assert main(["generate", "--model", tiny_model, "--prompt", "User: hello\n\nAssistant:",
                     "--max-tokens", "8", "--temperature", "0", "--device", "cpu", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] != outputs[1]


def test_wrong_shape_state_is_refused_naming_both_shapes(tmp_path, tiny_model, capsys):
    other = str(tmp_path / "wide.pth")
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(2, 64, 64) for i in range(3)}, other)
    assert main(["generate", "--model", tiny_model, "--state", other, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "[3, 2, 64, 64]" in err and "[2, 4, 64, 64]" in err


def test_batch_of_two_gives_the_sum_of_two_single_gradients(tiny_model):
    model, _ = load_model(tiny_model)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 65536, (2, 21), generator=g)
    targets = torch.randint(0, 65536, (2, 21), generator=g)
    mask = torch.ones(2, 21)
    mask[1, 15:] = 0  # uneven lengths: the sum must weigh each token once

    def summed_loss_grad(rows):
        s0 = torch.zeros(2, 4, 64, 64, requires_grad=True)
        hidden, _ = model.hidden(idx[rows], RNNState.from_time_state(s0, len(idx[rows]), 256))
        loss = masked_lm_loss(hidden, model.head, targets[rows], mask[rows]) * mask[rows].sum()
        return torch.autograd.grad(loss, s0)[0]

    both = summed_loss_grad(slice(0, 2))
    singles = summed_loss_grad(slice(0, 1)) + summed_loss_grad(slice(1, 2))
    assert both.abs().max() > 0
    torch.testing.assert_close(both, singles, rtol=1e-4, atol=1e-6)


def test_resume_after_a_crash_ends_with_the_same_state(tiny_model, tmp_path, monkeypatch):
    import rwkvray.train_loop as loop
    straight = tmp_path / "straight"
    train(make_spec(tiny_model, straight), LocalContext(str(straight)))

    crashed = tmp_path / "crashed"
    real_step = loop._train_step

    def crash_at_step_17(spec, engine, batcher, progress, ctx):
        if progress.step == 17:
            raise RuntimeError("simulated crash")
        return real_step(spec, engine, batcher, progress, ctx)

    monkeypatch.setattr(loop, "_train_step", crash_at_step_17)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_spec(tiny_model, crashed), LocalContext(str(crashed)))
    assert not (crashed / "rwkv-1.pth").exists()
    monkeypatch.setattr(loop, "_train_step", real_step)
    train(make_spec(tiny_model, crashed), LocalContext(str(crashed)))
    assert [r["step"] for r in read_metrics(crashed)] == list(range(1, 25))
    torch.testing.assert_close(load_state(str(crashed / "rwkv-1.pth")), load_state(str(straight / "rwkv-1.pth")), rtol=0, atol=0)


def test_init_from_state_file_starts_where_it_left_off(tiny_model, tmp_path):
    first = tmp_path / "first"
    train(make_spec(tiny_model, first), LocalContext(str(first)))
    again = tmp_path / "again"
    spec = make_spec(tiny_model, again, peft={"state": {"init_from": str(first / "rwkv-1.pth")}},
                     trainer={"epoch_count": 1, "epoch_steps": 2})
    train(spec, LocalContext(str(again)))
    assert read_metrics(again)[0]["loss"] < read_metrics(first)[0]["loss"] - 0.5


def test_wandb_offline_run_is_written(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = make_spec(tiny_model, tmp_path, trainer={"epoch_count": 1, "epoch_steps": 2},
                     logging={"wandb_project": "rwkvray-test"})
    train(spec, LocalContext(str(tmp_path)))
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    assert any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / runs[0]))
