"""A 4-trial ASHA sweep on a tiny model, 2 trials at a time, on a local Ray instance."""
import json
import os

import pytest

from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.cli import main
from rwkvray.spec import spec_from_dict
from rwkvray.model.init import default_dims, init_weights
from rwkvray.errors import UserError
from rwkvray.launch.sweep_plan import sample_configs
from rwkvray.launch.tune import run_sweep
from rwkvray.model.state_file import load_state
from tests.helpers import spec_with

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def sweep_spec(tmp_path):
    model = str(tmp_path / "tiny.pth")
    save_checkpoint(init_weights(default_dims(1, 128), seed=0, perturb=0.2), model)
    return spec_from_dict({
        "run": {"name": "sweep-test", "storage_path": str(tmp_path / "runs")},
        "model": {"path": model},
        "data": {"file": os.path.join(SAMPLE_DIR, "persona.jsonl"), "eval_file": os.path.join(SAMPLE_DIR, "persona_eval.jsonl"),
                 "ctx_len": 32, "loss_mask": "qa"},
        "trainer": {"epoch_count": 1, "epoch_steps": 16, "micro_bsz": 2, "precision": "fp32", "op": "torch", "seed": 1},
        "tune": {"num_samples": 4, "max_concurrent_trials": 2, "eval_every_steps": 4,
                 "space": {"lr_init": {"choice": [0.3, 0.1, 0.0003, 0.0001]}, "lr_final": {"choice": [0.0001]}},
                 "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 4}},
    }, "test")


def test_sweep_stops_a_trial_early_and_exports_the_best_state(local_ray, tmp_path, capsys):
    spec = sweep_spec(tmp_path)
    summary = run_sweep(spec)
    out = capsys.readouterr().out
    assert "stopped early" in out and "finished" in out
    sweep_dir = tmp_path / "runs" / "sweep-test"
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best == json.loads(json.dumps(summary))
    state = load_state(str(sweep_dir / "best_state.pth")).time_state
    assert state.shape == (1, 2, 64, 64) and state.abs().max() > 0
    trial_results = [json.loads(line) for path in sweep_dir.glob("sweep/*/result.json") for line in open(path)]
    assert len({r["trial_id"] for r in trial_results}) == 4
    lowest = min(r["val_loss"] for r in trial_results)
    assert best["val_loss"] == pytest.approx(lowest)
    assert best["trial"] == next(r["trial_id"] for r in trial_results if r["val_loss"] == lowest)
    assert best["params"]["lr_init"] in (0.3, 0.1)
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    assert f"best trial {best['trial']}: val_loss {best['val_loss']:.4f}, {params}\n" in out
    assert "Trial status" not in out and "╭" not in out  # Ray Tune's own trial tables stay off
    assert (sweep_dir / "trials" / best["trial"] / "rwkv-0.pth").exists()

    first_reports = sorted((r for r in trial_results if r["training_iteration"] == 1), key=lambda r: r["trial_id"])
    assert [r["config"] for r in first_reports] == sample_configs(spec, 4)  # sample i comes from the seed and i

    assert run_sweep(spec) == summary  # a finished sweep is read back from storage, not run again
    assert "sweep 'sweep-test' already complete: 4/4 trials\n" in capsys.readouterr().out
    changed = spec_with(spec, tune={"space": {**spec.tune.space, "lr_final": {"choice": [0.001]}}})
    with pytest.raises(UserError, match=r"^test: sweep 'sweep-test' in .* was started with a different spec \(changed: "
                                        r"tune.space.lr_final.choice\); use a new run.name, or --allow-changed-spec"):
        run_sweep(changed)

    # 4 -> 5 samples: the 4 finished trials stay; one new trial, the fifth sample of a fresh 5-trial sweep, runs
    # into the same storage; best.json is the best of all 5
    grown = spec_with(spec, tune={"num_samples": 5})
    summary = run_sweep(grown)
    out = capsys.readouterr().out
    assert "sweep 'sweep-test' grows from 4 to 5 trials\nresuming sweep 'sweep-test': 4 of 5 trials done\n" in out
    results = {part: [json.loads(line) for path in sweep_dir.glob(f"{part}/*/result.json") for line in open(path)]
               for part in ("sweep", "sweep-2")}
    assert {r["trial_id"] for r in results["sweep"]} == {r["trial_id"] for r in trial_results}  # not run again
    assert {r["trial_id"] for r in results["sweep-2"]} == {results["sweep-2"][0]["trial_id"]}
    assert results["sweep-2"][0]["config"] == sample_configs(grown, 5)[4]
    everything = results["sweep"] + results["sweep-2"]
    assert summary["val_loss"] == pytest.approx(min(r["val_loss"] for r in everything))
    assert json.loads((sweep_dir / "best.json").read_text()) == json.loads(json.dumps(summary))
    assert f"{summary['trial']}  " in out and all(f"{r['trial_id']}  " in out for r in everything)


@pytest.mark.parametrize("tune_block, message", [
    ({"space": {}}, "tune.space: must name at least one of lr_init, lr_final, warmup_steps, ctx_len"),
    ({"space": {"lr_init": {"gaussian": [0.1, 0.2]}}}, "tune.space.lr_init: unknown distribution 'gaussian'"),
    ({"space": {"lr_init": {"loguniform": [0, 0.1]}}}, "tune.space.lr_init: learning rates must be > 0"),
    ({"space": {"lr_init": {"choice": [0.1]}}, "num_samples": 0}, "tune.num_samples: must be ≥ 1"),
])
def test_bad_tune_block_fails_fast_without_ray(tmp_path, capsys, tune_block, message):
    import yaml
    spec = {"model": {"path": str(tmp_path / "m.pth")}, "data": {"file": os.path.join(SAMPLE_DIR, "persona.jsonl"), "holdout_fraction": 0.1},
            "tune": tune_block}
    (tmp_path / "m.pth").write_bytes(b"")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    was_running = ray.is_initialized()
    assert main(["tune", str(tmp_path / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert ray.is_initialized() == was_running
