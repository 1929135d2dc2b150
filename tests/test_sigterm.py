"""SIGTERM to the process group, as supervisors and container runtimes stop a process: `rwkvray run` stops with
one line (exit 143) and the run resumes from its checkpoint. (`rwkvray serve`: tests/test_readme_serving.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import SAMPLE

pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def start_run(folder) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray instance of its own
    return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "rwkvray"), "run", "spec.yaml"],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(run: subprocess.Popen, lines: list[str], timeout: float) -> tuple[int, list[str]]:
    try:
        lines += run.stdout.read().splitlines()
        return run.wait(timeout=timeout), lines
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def test_sigterm_to_the_group_stops_a_run_with_one_line_and_the_rerun_resumes(make_tiny_model, tmp_path):
    spec = {"run": {"name": "term", "storage_path": str(tmp_path / "runs"), "checkpoint_every_steps": 40},
            "model": {"path": make_tiny_model(1, 64)},
            "data": {"file": SAMPLE, "ctx_len": 32},
            "trainer": {"epoch_count": 1, "epoch_steps": 400, "micro_bsz": 2, "precision": "fp32", "op": "torch"},
            "scaling": {"num_workers": 1}, "logging": {"wandb_mode": "disabled"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

    run, lines = start_run(tmp_path), []
    snapshot = tmp_path / "runs" / "term" / "checkpoint_manager_snapshot.json"  # Ray Train's checkpoint record
    for line in run.stdout:
        lines.append(line.rstrip("\n"))
        if "checkpoint saved" in line:
            while not snapshot.exists() and run.poll() is None:
                time.sleep(0.1)
            os.killpg(run.pid, signal.SIGTERM)
            break
    status, lines = finish(run, lines, timeout=60)
    assert status == 128 + signal.SIGTERM, "\n".join(lines)
    assert lines[-1] == "terminated; resume with: rwkvray run spec.yaml"
    assert "Traceback" not in "\n".join(lines)

    status, lines = finish(start_run(tmp_path), [], timeout=300)
    assert status == 0, "\n".join(lines)
    assert lines[0].startswith("resuming run 'term' from step ")
    with open(tmp_path / "runs" / "term" / "metrics.jsonl") as f:
        assert [json.loads(row)["step"] for row in f] == list(range(1, 401))
    assert (tmp_path / "runs" / "term" / "rwkv-final.pth").exists()
