"""The README's submitted form of the demo: `ray job submit --working-dir .` of jobs/demo_state_cpu.yaml to a
head this test starts (and stops, by PID). Its outputs must land where the docs say: ~/rwkvray/runs/<name>, and
its published state in ~/rwkvray/out/states."""
import os
import sys
import time

import pytest

from tests.helpers import running_ray_head

pytest.importorskip("ray")
pytestmark = pytest.mark.ray
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def head_with_home(tmp_path):
    """A Ray head whose jobs see HOME=tmp_path/home (DeepSpeed's built ops stay where they are)."""
    env = {"HOME": str(tmp_path / "home"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.expanduser("~/.cache/torch_extensions"))}
    with running_ray_head(tmp_path / "head.log", env=env) as url:
        yield url


def test_submitted_demo_writes_its_outputs_under_home(head_with_home, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    rwkvray = os.path.join(os.path.dirname(sys.executable), "rwkvray")
    entrypoint = (f"{rwkvray} init-model --n-layer 2 --n-embd 256 --perturb 0.2 --out out/tiny.pth && "
                  f"{rwkvray} run jobs/demo_state_cpu.yaml")
    deadline = time.time() + 300
    while True:  # the dashboard and its job agent come up some seconds (minutes, on a loaded machine) after the head
        try:
            client = JobSubmissionClient(head_with_home)
            job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": REPO})
            break
        except (ConnectionError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and "No available agent" not in str(error):
                raise
            assert time.time() < deadline, f"the head did not accept the job: {error}"
            time.sleep(3)
    deadline = time.time() + 540
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "the demo job did not finish in 9 minutes"
        time.sleep(3)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    outputs = tmp_path / "home" / "rwkvray" / "runs" / "demo-state-cpu"
    assert f"final state file: {outputs / 'rwkv-final.pth'}" in logs
    for name in ("rwkv-0.pth", "rwkv-2.pth", "rwkv-final.pth", "rwkv-final.json", "metrics.jsonl", "loss.png"):
        assert (outputs / name).stat().st_size > 0, name
    published = tmp_path / "home" / "rwkvray" / "out" / "states" / "persona.pth"  # run.publish: out/states
    assert f"published persona: {published}" in logs
    assert published.read_bytes() == (outputs / "rwkv-final.pth").read_bytes()
    assert "step 180/180: loss" in logs and "Checkpoint successfully created" not in logs
    assert "all_gather_into_tensor" not in logs and "TrainingReport(" not in logs
