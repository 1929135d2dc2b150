"""What a rerun says before anything starts: a new run, resuming from step N, a refused spec change."""
import json
import os

import pytest

from rwkvray.spec import spec_from_dict
from rwkvray.errors import UserError
from rwkvray.launch.resume import check_rerun

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


def spec(model, storage, **trainer):
    return spec_from_dict({"run": {"name": "again", "storage_path": str(storage)}, "model": {"path": model},
                           "data": {"file": SAMPLE}, "trainer": {"epoch_steps": 6, "epoch_count": 2, **trainer}},
                          "job.yaml")


def test_rerun_messages(make_tiny_model, tmp_path, capsys):
    model = make_tiny_model(1, 64)
    assert check_rerun(spec(model, tmp_path)) is None
    assert capsys.readouterr().out == ""
    (tmp_path / "again" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    assert check_rerun(spec(model, tmp_path, proj_dir=str(tmp_path / "elsewhere"))) == 4
    assert capsys.readouterr().out == "resuming run 'again' from step 4/12\n"
    with pytest.raises(UserError) as refused:
        check_rerun(spec(model, tmp_path, micro_bsz=2))
    assert str(refused.value) == (f"job.yaml: run 'again' in {tmp_path / 'again'} was started with a different spec "
                                  "(changed: trainer.micro_bsz); use a new run.name, or --allow-changed-spec to "
                                  "resume with the new values")
    assert check_rerun(spec(model, tmp_path, micro_bsz=2), allow_changed_spec=True) == 4
    assert "resuming with a changed spec (changed: trainer.micro_bsz)" in capsys.readouterr().out


def test_sweep_rerun_messages(make_tiny_model, tmp_path, capsys):
    """Without Ray: a sweep recorded with 2 samples whose experiment never started resumes at 0 of 2; a grown
    num_samples adds a part; a shrunk one is a change."""
    from rwkvray.launch.sweep_plan import Part, plan_sweep
    tuned = spec(make_tiny_model(1, 64), tmp_path, epoch_count=1).model_dump(mode="json", exclude_unset=True)
    tuned["data"]["holdout_fraction"] = 0.1
    tuned["tune"] = {"num_samples": 2, "space": {"lr_init": {"loguniform": [0.001, 0.1]}}}
    sweep = spec_from_dict(tuned, "tune.yaml")
    assert plan_sweep(sweep).parts == [Part("sweep", 0, 2)]
    assert capsys.readouterr().out == ""
    assert plan_sweep(sweep).parts == [Part("sweep", 0, 2)]
    assert capsys.readouterr().out == "resuming sweep 'again': 0 of 2 trials done\n"
    tuned["tune"]["num_samples"] = 3
    assert plan_sweep(spec_from_dict(tuned, "tune.yaml")).parts == [Part("sweep", 0, 2), Part("sweep-2", 2, 1)]
    assert capsys.readouterr().out == ("sweep 'again' grows from 2 to 3 trials\n"
                                       "resuming sweep 'again': 0 of 3 trials done\n")
    tuned["tune"]["num_samples"] = 1
    with pytest.raises(UserError, match=r"^tune.yaml: sweep 'again' in .* started with a different spec \(changed: "
                                        r"tune.num_samples\)"):
        plan_sweep(spec_from_dict(tuned, "tune.yaml"))
