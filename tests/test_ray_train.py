"""Ray Train + DeepSpeed on CPU: 2 workers, ZeRO stages, fault recovery. One local Ray instance for the module."""
import json
import os
import shutil

import pytest
import torch

from rwkvray.errors import UserError
from rwkvray.launch.outputs import export_outputs
from rwkvray.launch.run import run_on_ray
from rwkvray.model.state_file import load_state
from tests import worker_hooks
from tests.helpers import spec_with, two_worker_spec

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray(fault_marker):
    crash = {"run": "faulty", "step": 6, "marker": str(fault_marker)}  # see test_killed_worker_resumes_...
    ray.init(address="local", num_cpus=2, log_to_driver=False, runtime_env=worker_hooks.runtime_env(crash))
    yield
    ray.shutdown()


def losses(spec):
    with open(os.path.join(spec.trainer.proj_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def zero1_run(local_ray, tiny_model, tmp_path_factory):
    spec = two_worker_spec(tiny_model, tmp_path_factory.mktemp("runs"), "zero1")
    spec = spec_with(spec, trainer={"proj_dir": str(tmp_path_factory.mktemp("driver") / "zero1")})  # the driver's own disk
    return spec, run_on_ray(spec)


def test_two_worker_zero1_lowers_loss_and_keeps_replicas_identical(zero1_run):
    spec, result = zero1_run
    assert result.error is None
    assert result.metrics["replica_divergence"] == 0.0
    rows = losses(spec)
    assert len(rows) == 12
    assert sum(rows[-3:]) / 3 < sum(rows[:3]) / 3 - 0.3
    final = load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    assert final.shape == (2, 2, 64, 64) and final.abs().max() > 0
    assert torch.equal(final, load_state(os.path.join(spec.trainer.proj_dir, "rwkv-1.pth")).time_state)


def test_sharded_evaluation_equals_the_whole_set_mean(zero1_run):
    """Each rank evaluates half the batches, then the sums are all-reduced: the same token-weighted mean as one
    process evaluating every piece with the final state."""
    from rwkvray.train.data import eval_batches, load_documents
    from rwkvray.model.rwkv import load_model
    from rwkvray.peft.base import PeftModel
    from rwkvray.peft.state import StateTuning
    spec, result = zero1_run
    model, _ = load_model(spec.model.path)
    module = PeftModel(model, [StateTuning(load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")))]).eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in eval_batches(load_documents(spec.data.eval_file, "jsonl", "qa"), 32, 2):
            n = batch.mask.sum().item()
            total += module(batch.input_ids, batch.targets, batch.mask).item() * n
            count += n
    assert result.metrics["val_loss"] == pytest.approx(total / count, rel=1e-4)


def test_driver_outputs_come_from_run_storage_only(zero1_run, capsys):
    """Workers write only to run storage: with the driver's folder deleted, exporting again from storage and
    the last checkpoint gives every user-facing file back."""
    spec, result = zero1_run
    local = spec.trainer.proj_dir
    expected = sorted(os.listdir(local))
    assert {"rwkv-0.pth", "rwkv-0.json", "rwkv-1.pth", "rwkv-final.pth", "rwkv-final.json", "metrics.jsonl",
            "loss.png"} <= set(expected)
    shutil.rmtree(local)
    export_outputs(spec, result.checkpoint)
    assert sorted(os.listdir(local)) == expected
    assert f"final state file: {os.path.join(local, 'rwkv-final.pth')}" in capsys.readouterr().out
    assert torch.equal(load_state(os.path.join(local, "rwkv-final.pth")).time_state, load_state(os.path.join(local, "rwkv-1.pth")).time_state)


def test_rerun_says_complete_and_refuses_a_changed_spec(zero1_run, capsys):
    spec, _ = zero1_run
    assert run_on_ray(spec) is None
    assert "run 'zero1' already complete at step 12/12" in capsys.readouterr().out
    changed = spec_with(spec, optim={"lr_init": 0.3}, trainer={"seed": 8})
    with pytest.raises(UserError, match=r"started with a different spec \(changed: optim.lr_init, trainer.seed\); "
                                        "use a new run.name, or --allow-changed-spec"):
        run_on_ray(changed)


def folder_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def test_checkpoint_holds_no_frozen_base(zero1_run, tiny_model):
    """Trainable tensors, optimizer and progress only: at most 4x the trainable bytes + 1 MB."""
    spec, result = zero1_run
    trainable_bytes = load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state.numel() * 4
    assert os.path.getsize(tiny_model) >= 50 * trainable_bytes
    checkpoint_bytes = folder_bytes(result.checkpoint.path)
    assert checkpoint_bytes <= 4 * trainable_bytes + 2**20, (checkpoint_bytes, trainable_bytes)
    names = set(os.listdir(result.checkpoint.path))
    assert {"progress.json", "state.pth", "rng-0.pt", "rng-1.pt"} <= names


def test_killed_worker_resumes_to_the_same_final_state(zero1_run, tiny_model, tmp_path, fault_marker):
    """The last worker of run "faulty" exits after its step-6 report (tests/worker_hooks.py)."""
    reference_spec, _ = zero1_run
    spec = spec_with(two_worker_spec(tiny_model, tmp_path, "faulty"), run={"max_failures": 1})
    result = run_on_ray(spec)
    assert fault_marker.exists()
    assert result.error is None
    assert [json.loads(line)["step"] for line in open(os.path.join(spec.trainer.proj_dir, "metrics.jsonl"))] == list(range(1, 13))
    final = load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    reference = load_state(os.path.join(reference_spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    torch.testing.assert_close(final, reference, rtol=1e-5, atol=1e-6)


def test_two_worker_infctx_trains_as_the_unchunked_run(zero1_run, tmp_path):
    """--train_type infctx on 2 DeepSpeed workers: each 32-token sample in chunks of 8, the gradient through the
    chunks; the same losses, step by step, as the unchunked run (the chunked gradient is the same gradient)."""
    reference_spec, _ = zero1_run
    spec = spec_with(two_worker_spec(reference_spec.model.path, tmp_path, "infctx"), trainer={"chunk_ctx": 8})
    result = run_on_ray(spec)
    assert result.error is None
    assert result.metrics["replica_divergence"] == 0.0
    assert losses(spec) == pytest.approx(losses(reference_spec), rel=1e-3)
    final = load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    reference = load_state(os.path.join(reference_spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    torch.testing.assert_close(final, reference, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("stage, lora", [(2, True), (3, False)])
def test_zero2_and_zero3_complete(local_ray, tiny_model, tmp_path, stage, lora):
    """ZeRO-2 trains LoRA plus the state (a weight method through Ray Train); ZeRO-3 the state alone."""
    spec = spec_with(two_worker_spec(tiny_model, tmp_path, f"zero{stage}", stage), trainer={"epoch_count": 1})
    if lora:
        spec = spec_with(spec, peft={"method": "lora", "combine_state": True})
    result = run_on_ray(spec)
    assert result.error is None
    assert result.metrics["replica_divergence"] == 0.0
    final = load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    assert final.shape == (2, 2, 64, 64) and final.abs().max() > 0
    if lora:
        adapter = torch.load(os.path.join(spec.trainer.proj_dir, "lora-final.pth"), weights_only=True)
        assert adapter["blocks.0.att.key.lora_B"].abs().max() > 0
