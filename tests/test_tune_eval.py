"""A sweep ranked by an eval metric: each report scores the trial's current state on the eval block's data."""
import asyncio
import json
import os
import re

import pytest

from rwkvray.errors import UserError
from rwkvray.eval.metrics import summarize, value_of
from rwkvray.eval.job import read_all_items
from rwkvray.eval.scoring import evaluate
from rwkvray.launch.tune import run_sweep
from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.model.init import default_dims, init_weights
from rwkvray.model.rwkv import load_model
from rwkvray.model.state_file import load_state
from rwkvray.engine.batch_engine import BatchEngine
from rwkvray.spec import spec_from_dict
from rwkvray.text.tokenizer import get_tokenizer

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data")
METRIC = "eval/quiz.jsonl/loss"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def eval_sweep(tmp_path, **tune):
    model = str(tmp_path / "tiny.pth")
    save_checkpoint(init_weights(default_dims(1, 64), seed=0, perturb=0.2), model)
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(line for line in open(os.path.join(SAMPLE_DIR, "persona_quiz.jsonl"))
                            if '"messages"' in line or '"choices"' in line))
    return spec_from_dict({
        "run": {"name": "eval-sweep", "storage_path": str(tmp_path / "runs")},
        "model": {"path": model},
        "data": {"file": os.path.join(SAMPLE_DIR, "persona.jsonl"),
                 "eval_file": os.path.join(SAMPLE_DIR, "persona_eval.jsonl"), "ctx_len": 32, "loss_mask": "qa"},
        "trainer": {"epoch_count": 1, "epoch_steps": 12, "micro_bsz": 2, "precision": "fp32", "op": "torch",
                    "seed": 1},
        "eval": {"data": [str(quiz)], "batch_size": 8},
        "tune": {"num_samples": 3, "max_concurrent_trials": 1, "eval_every_steps": 4,  # lr_init 0.0078, 0.33, 0.00034
                 "space": {"lr_init": {"loguniform": [0.0001, 0.5]}, "lr_final": {"choice": [0.0001]}},
                 "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 3},
                 "metric": METRIC, **tune},
    }, "test")


def test_best_trial_follows_the_eval_metric_not_val_loss(local_ray, tmp_path, capsys):
    """mode max on the eval loss ranks the trials against val_loss, so the pick can only come from the eval
    metric: the best trial is the one whose state the eval data fits worst, not the lowest val_loss."""
    summary = run_sweep(eval_sweep(tmp_path, mode="max"))
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "runs" / "eval-sweep"
    reports = [json.loads(line) for path in sweep_dir.glob("sweep/*/result.json") for line in open(path)]
    assert all(METRIC in r and "eval/quiz.jsonl/mc_acc" in r and "val_loss" in r for r in reports)
    highest = max(reports, key=lambda r: r[METRIC])
    lowest_val = min(reports, key=lambda r: r["val_loss"])
    assert summary["trial"] == highest["trial_id"] != lowest_val["trial_id"]
    assert summary[METRIC] == pytest.approx(highest[METRIC])
    assert json.loads((sweep_dir / "best.json").read_text())["trial"] == highest["trial_id"]
    assert f"best {METRIC}  best val_loss  reports" in out
    # ASHA ranks on the eval metric too: the trial stopped after its first report is the one whose state the eval
    # data fit best there (the lowest loss: worst under mode max), compared with the trial that ran before it
    assert "stopped early" in out
    first = {r["trial_id"]: r for r in reports if r["training_iteration"] == 1}
    counts = {trial: sum(r["trial_id"] == trial for r in reports) for trial in first}
    stopped = [trial for trial, count in counts.items() if count == 1]
    assert len(stopped) == 1 and first[stopped[0]][METRIC] < min(r[METRIC] for t, r in first.items() if t != stopped[0])

    # best_state.pth is the state of the reported checkpoint that scored best: scoring it again gives that value
    spec = eval_sweep(tmp_path, mode="max")
    items = read_all_items(spec.eval.data, get_tokenizer())
    state = load_state(str(sweep_dir / "best_state.pth"))

    async def score():
        engine = BatchEngine(load_model(spec.model.path)[0], get_tokenizer(), max_batch_size=8)
        return await evaluate(engine, items, {"best": state}, spec.eval.max_tokens, 8)
    assert value_of(summarize(asyncio.run(score())), "best", "quiz.jsonl", "loss") == pytest.approx(
        summary[METRIC], rel=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"metric": "eval/other.jsonl/loss"}, "tune.metric: other.jsonl is not one of eval.data's files (quiz.jsonl)"),
    ({"metric": "eval/quiz.jsonl/bleu"}, "tune.metric: must be val_loss, train_loss or eval/<file>/<metric> with "
     "metric one of mc_acc, exact, contains, loss (got 'eval/quiz.jsonl/bleu')"),
])
def test_an_eval_metric_names_a_file_and_metric_of_the_eval_block(tmp_path, change, message):
    with pytest.raises(UserError, match="^" + re.escape(f"test: {message}") + "$"):
        eval_sweep(tmp_path, **change)
