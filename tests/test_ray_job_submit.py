"""`ray job submit` of a job spec to a head node this test starts (and stops, by PID)."""
import os
import shutil
import sys
import time
import uuid

import pytest
import requests
import yaml

from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.model.init import default_dims, init_weights
from tests.helpers import running_ray_head

pytest.importorskip("ray")
pytestmark = pytest.mark.ray
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


@pytest.fixture
def ray_head(tmp_path):
    with running_ray_head(tmp_path / "head.log") as url:
        yield url


DASHBOARD_NOT_READY = (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)
NO_AGENT_YET = "No available agent to submit job"  # Ray's answer (HTTP 500) while the head's job agent starts


def while_dashboard_starts(call, timeout=120):
    """call(), retried for a bounded time while the dashboard is still coming up (a loaded machine takes a while).
    Only connection errors and Ray's "no agent yet" answer mean that: any other error raises at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Exception as err:
            if not (isinstance(err, DASHBOARD_NOT_READY) or NO_AGENT_YET in str(err)) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def submit(client, **job) -> str:
    """submit_job, retried while the dashboard starts; a fixed submission id keeps a retry from starting a second
    copy of a job whose first submission got through but whose answer was lost."""
    submission_id = f"rwkvray-test-{uuid.uuid4().hex[:12]}"

    def once():
        try:
            return client.submit_job(submission_id=submission_id, **job)
        except RuntimeError as err:
            if f"{submission_id} already exists" in str(err):
                return submission_id
            raise

    return while_dashboard_starts(once)


def test_ray_job_submit_runs_a_spec_and_a_resubmission_after_an_edit_resumes_it(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient
    work = tmp_path / "work"
    work.mkdir()
    save_checkpoint(init_weights(default_dims(1, 64), seed=0, perturb=0.2), str(work / "tiny.pth"))
    shutil.copy(SAMPLE, work / "data.jsonl")
    spec = {"run": {"name": "submitted", "storage_path": str(tmp_path / "runs")},
            "model": {"path": "tiny.pth"}, "data": {"file": "data.jsonl", "ctx_len": 32},
            "trainer": {"epoch_count": 1, "epoch_steps": 3, "micro_bsz": 2, "precision": "fp32", "op": "torch"},
            "scaling": {"num_workers": 1}}
    (work / "job.yaml").write_text(yaml.safe_dump(spec))

    client = while_dashboard_starts(lambda: JobSubmissionClient(ray_head))
    logs = submitted_logs(client, work)
    final = tmp_path / "runs" / "submitted" / "rwkv-final.pth"
    assert f"final state file: {final}" in logs
    assert final.stat().st_size > 0

    # any edit moves Ray's copy of the working dir (_ray_pkg_<content hash>), and with it the spec's paths
    (work / "notes.txt").write_text("edited after the first submission\n")
    logs = submitted_logs(client, work)
    assert "run 'submitted' already complete at step 3/3" in logs and "different spec" not in logs


def submitted_logs(client, work) -> str:
    """Submit `rwkvray run job.yaml` with `work` as the working dir, wait for success; its logs."""
    from ray.job_submission import JobStatus
    rwkvray = os.path.join(os.path.dirname(sys.executable), "rwkvray")
    job = submit(client, entrypoint=f"{rwkvray} run job.yaml", runtime_env={"working_dir": str(work)})
    deadline = time.time() + 300
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "job did not finish in 5 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    return logs
