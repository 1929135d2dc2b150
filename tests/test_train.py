"""State tuning end to end in one process: loss falls, base frozen, files written, resume, batch gradients."""
import json
import os
import shlex

import pytest
import torch

from rwkvray.model.checkpoint import load_checkpoint
from rwkvray.cli import main
from rwkvray.spec import spec_from_dict
from rwkvray.launch.run import run_on_ray
from rwkvray.model.rwkv import load_model
from rwkvray.peft.state import from_time_state
from rwkvray.model.loss import masked_lm_loss
from rwkvray.model.state_card import file_sha256, read_card
from rwkvray.model.state_file import load_state

ray = pytest.importorskip("ray")
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model):
    return make_tiny_model(2, 256)


def make_spec(model_path, storage, **overrides):
    data = {
        "run": {"storage_path": str(storage), "name": "run"},
        "model": {"path": model_path},
        "data": {"file": SAMPLE, "ctx_len": 64, "loss_mask": "qa"},
        "optim": {"lr_init": 0.1, "lr_final": 0.02, "warmup_steps": 2},
        "trainer": {"epoch_count": 2, "epoch_steps": 12, "micro_bsz": 4, "precision": "fp32", "op": "torch",
                    "seed": 3},
    }
    for block, values in overrides.items():
        data.setdefault(block, {}).update(values)
    return spec_from_dict(data, "test")


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.ray
def test_one_worker_train_command_runs_deepspeed_and_lowers_loss(local_ray, tiny_model, tmp_path, capsys,
                                                                 monkeypatch):
    """`rwkvray train --devices 1 --strategy deepspeed_stage_2`: one Ray worker on the same DeepSpeed engine
    (its checkpoint holds a ZeRO optimizer partition, which plain AdamW would not write), loss falls, the base
    stays bit-identical, epoch files carry RWKV-PEFT's layout and a state card, generation changes."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    before = load_checkpoint(tiny_model).weights
    out = tmp_path / "out"
    command = f"""--load_model {tiny_model} --proj_dir {out} --data_file {SAMPLE} --ctx_len 64 --loss_mask qa
        --micro_bsz 4 --epoch_steps 12 --epoch_count 2 --lr_init 0.1 --lr_final 0.02 --warmup_steps 2
        --precision fp32 --op torch --random_seed 3 --accelerator cpu --devices 1 --strategy deepspeed_stage_2
        --name run --wandb rwkvray-test --wandb_mode offline"""
    assert main(["train", *shlex.split(command)]) == 0
    printed = capsys.readouterr().out
    assert f"final state file: {out / 'rwkv-final.pth'}" in printed
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.8, (first, last)
    assert f"loss {sum(r['loss'] for r in rows[:5]) / 5:.3f} -> {sum(r['loss'] for r in rows[-5:]) / 5:.3f}" in printed
    after = load_checkpoint(tiny_model).weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name in ("rwkv-0.pth", "rwkv-1.pth", "rwkv-final.pth", "loss.png"):
        assert os.path.getsize(out / name) > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.equal(load_state(str(out / "rwkv-final.pth")).time_state, load_state(str(out / "rwkv-1.pth")).time_state)
    checkpoints = sorted(p for p in (out / "run").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and (checkpoints[-1] / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()
    assert any(f.endswith(".wandb") for run in (out / "wandb").glob("offline-run-*") for f in os.listdir(run))

    raw = torch.load(out / "rwkv-0.pth", weights_only=True)
    assert sorted(raw) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert all(t.shape == (4, 64, 64) and t.dtype == torch.float32 for t in raw.values())
    for stem, steps in (("rwkv-0", 12), ("rwkv-final", 24)):
        card = read_card(str(out / f"{stem}.pth"))
        assert card["base"] == {"sha256": file_sha256(tiny_model), "file": os.path.basename(tiny_model),
                                "version": "x070", "n_layer": 2, "n_embd": 256, "head_size": 64, "vocab_size": 65536}
        assert card["method"] == "state" and card["steps"] == steps
        assert card["data"] == {"file": "persona.jsonl", "size": os.path.getsize(SAMPLE)}
    outputs = []
    for extra in ([], ["--state", str(out / "rwkv-0.pth")]):
        assert main(["generate", "--model", tiny_model, "--prompt", "User: hello\n\nAssistant:",
                     "--max-tokens", "8", "--temperature", "0", "--device", "cpu", *extra]) == 0
        outputs.append(capsys.readouterr())
    assert outputs[0].out != outputs[1].out
    assert "warning" not in outputs[1].err


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
        hidden, _ = model.hidden(idx[rows], from_time_state(s0, len(idx[rows]), 256))
        loss = masked_lm_loss(hidden, model.head, targets[rows], mask[rows]) * mask[rows].sum()
        return torch.autograd.grad(loss, s0)[0]

    both = summed_loss_grad(slice(0, 2))
    singles = summed_loss_grad(slice(0, 1)) + summed_loss_grad(slice(1, 2))
    assert both.abs().max() > 0
    torch.testing.assert_close(both, singles, rtol=1e-4, atol=1e-6)


@pytest.mark.ray
def test_init_from_state_file_is_where_training_starts(local_ray, tiny_model, tmp_path):
    init = {f"blocks.{i}.att.time_state": 0.5 * torch.randn(4, 64, 64) for i in range(2)}
    torch.save(init, tmp_path / "init.pth")
    spec = make_spec(tiny_model, tmp_path, peft={"state": {"init_from": str(tmp_path / "init.pth")}},
                     trainer={"epoch_count": 1, "epoch_steps": 2}, optim={"lr_init": 1e-9, "lr_final": 1e-9})
    run_on_ray(spec)
    torch.testing.assert_close(load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state,
                               load_state(str(tmp_path / "init.pth")).time_state, rtol=0, atol=1e-6)


def test_generate_warns_when_the_state_card_names_another_base(tiny_model, tmp_path, capsys):
    from rwkvray.model.state_card import base_fingerprint, write_card
    state = tmp_path / "other.pth"
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(4, 64, 64) for i in range(2)}, state)
    card = {"base": {**base_fingerprint(tiny_model), "sha256": "0" * 64, "file": "rwkv7-g1-1.5b.pth"}, "method": "state"}
    write_card(str(state), card)
    assert main(["generate", "--model", tiny_model, "--state", str(state), "--prompt", "hi", "--max-tokens", "2",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().err == (f"warning: {state}: the state was tuned on rwkv7-g1-1.5b.pth (sha256 000000000000…), "
                                       f"not on {os.path.basename(tiny_model)}: a state works only on the exact model it "
                                       "was tuned on\n")


def test_offload_strategy_on_cpu_is_refused_before_ray_starts(tiny_model, capsys):
    """One worker gets the same DeepSpeed config as many: offload cannot be dropped quietly, so on CPU it is
    refused up front (on a GPU it runs; test_one_worker_train_command... proves --strategy reaches DeepSpeed)."""
    command = f"--load_model {tiny_model} --data_file {SAMPLE} --accelerator cpu --devices 1 --strategy deepspeed_stage_2_offload"
    assert main(["train", *shlex.split(command)]) == 2
    err = capsys.readouterr().err
    assert err == ("error: train flags: --strategy: deepspeed_stage_2_offload moves the optimizer to CPU memory, "
                   "where it already is on --accelerator cpu: use deepspeed_stage_2\n")
