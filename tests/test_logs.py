"""What a person reads from `rwkvray run`: each line once, no Ray error lines (also with a second Ray instance on
the machine), and Ctrl-C or SIGTERM as one line (exit 130 or 143) that names the command resuming the run, which
then continues from its checkpoint."""
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

pytestmark = pytest.mark.ray
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


@pytest.fixture
def another_ray_instance():
    """A second local Ray instance on this machine (its own ports and temp dir), as another user's script has:
    Ray then cannot tell which instance a process means by "the Ray on this machine"."""
    temp_dir = tempfile.mkdtemp(prefix="rwkvray-other-ray-")  # short: Ray's socket paths live under it
    script = ("import sys, ray; ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1]); "
              "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen([sys.executable, "-c", script, temp_dir], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert other.stdout.readline().strip(), "the second Ray instance did not start"
        yield
    finally:
        other.stdin.close()  # it shuts its instance down and exits
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_run(tmp_path) -> subprocess.Popen:
    """`rwkvray run spec.yaml` in a session of its own, so a SIGINT to its group is what Ctrl-C in a terminal
    sends (Ray's own processes block it)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray instance of its own
    return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "rwkvray"), "run", "spec.yaml"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(run: subprocess.Popen, lines: list[str]) -> tuple[int, list[str]]:
    try:
        lines += run.stdout.read().splitlines()
        return run.wait(timeout=120), lines
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def ours(lines: list[str]) -> list[str]:
    """The lines rank 0's loop prints, without Ray's "(RayTrainWorker pid=...)" prefix."""
    prefix = re.compile(r"^.*\(RayTrainWorker pid=\d+\)(\x1b\[0m)?\s*")
    return [prefix.sub("", line) for line in lines if "RayTrainWorker" in line and ("step" in line or "saved" in line)]


def stop_after_a_checkpoint(run: subprocess.Popen, lines: list[str], snapshot, signum: int,
                            to_group: bool = True) -> tuple[int, list[str]]:
    """Send `signum` to the run's group (or to the command alone) once Ray Train has registered a checkpoint, then
    read it to its end."""
    for line in run.stdout:
        lines.append(line.rstrip("\n"))
        if "checkpoint saved" in line:
            recorded = snapshot.read_text() if snapshot.exists() else None
            while (not snapshot.exists() or snapshot.read_text() == recorded) and run.poll() is None:
                time.sleep(0.1)  # Ray Train records this checkpoint (a new snapshot), so a resume starts from it
            (os.killpg if to_group else os.kill)(run.pid, signum)
            break
    return finish(run, lines)


def test_each_line_once_ctrl_c_and_sigterm_are_one_line_then_the_run_resumes(make_tiny_model, another_ray_instance,
                                                                             tmp_path):
    """Ctrl-C (SIGINT to the group, as a terminal sends it: exit 130), then on the resumed run SIGTERM to the
    command, as container runtimes stop a container's main process (exit 143); the next rerun resumes to the end.
    (A SIGTERM to the whole group also reaches the local Ray instance's raylet, and Ray's core worker may end the
    command with exit 1 before Python handles the signal; the checkpoints are kept either way. `rwkvray serve`
    and SIGTERM: tests/test_readme_serving.py.)"""
    spec = {"run": {"name": "logs", "storage_path": str(tmp_path / "runs"), "checkpoint_every_steps": 2},
            "model": {"path": make_tiny_model(1, 64)},
            "data": {"file": SAMPLE, "ctx_len": 32, "loss_mask": "qa"},
            "trainer": {"epoch_count": 1, "epoch_steps": 30, "micro_bsz": 2, "precision": "fp32", "op": "torch"},
            "scaling": {"num_workers": 1}, "logging": {"wandb_mode": "disabled"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    snapshot = tmp_path / "runs" / "logs" / "checkpoint_manager_snapshot.json"  # Ray Train's checkpoint record

    status, lines = stop_after_a_checkpoint(start_run(tmp_path), [], snapshot, signal.SIGINT)
    assert status == 130, "\n".join(lines)
    assert lines[-1] == "interrupted; resume with: rwkvray run spec.yaml"
    text = "\n".join(lines)  # Ray's PlacementGroupCleaner found its own instance among two (no ConnectionError)
    assert "Found multiple active Ray instances" not in text and "PlacementGroupCleaner" not in text
    assert "Traceback" not in text and "PreemptionWatcher" not in text and "core_worker" not in text
    printed = ours(lines)
    assert printed[0] == "start at step 0 of 30" and printed[1].startswith("step 2/30: loss ")
    assert len(printed) == len(set(printed)), printed  # every line once, not once per log handler

    status, lines = stop_after_a_checkpoint(start_run(tmp_path), [], snapshot, signal.SIGTERM, to_group=False)
    assert status == 128 + signal.SIGTERM, "\n".join(lines)
    assert lines[0].startswith("resuming run 'logs' from step ")
    assert lines[-1] == "terminated; resume with: rwkvray run spec.yaml"
    assert "Traceback" not in "\n".join(lines) and "Found multiple active Ray instances" not in "\n".join(lines)
    first_resume = int(ours(lines)[0].removeprefix("start at step ").split()[0])

    status, lines = finish(start_run(tmp_path), [])
    assert status == 0, "\n".join(lines)
    assert "Found multiple active Ray instances" not in "\n".join(lines)
    assert lines[0].startswith("resuming run 'logs' from step ")
    printed = ours(lines)
    assert len(printed) == len(set(printed)), printed
    resumed_at = int(printed[0].removeprefix("start at step ").split()[0])
    assert 2 <= first_resume < resumed_at and printed[-1].startswith("step 30/30: loss")
    with open(tmp_path / "runs" / "logs" / "metrics.jsonl") as f:
        assert [json.loads(row)["step"] for row in f] == list(range(1, 31))
    assert (tmp_path / "runs" / "logs" / "rwkv-final.pth").exists()


def test_a_step_that_prints_its_report_line_prints_no_progress_line(tmp_path, capsys, monkeypatch):
    from rwkvray.train import metrics
    monkeypatch.setattr(metrics, "PROGRESS_EVERY_S", 0.0)  # a progress line at every step that has no report
    logger = metrics.RunLogger(str(tmp_path), total_steps=2)
    logger.log_step(1, 2.0, 1e-3, 100.0)
    logger.log_step(2, 1.5, 1e-3, 100.0, report_follows=True)  # the last step: its report line follows
    assert capsys.readouterr().out.splitlines() == ["start at step 0 of 2", "step 1/2 loss 2.0000 lr 1.000e-03 tok/s 100"]
