"""benchmarks/serve_bench.py runs end to end on a tiny model and writes every workload's figures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.ray


def test_serve_bench_writes_all_workloads(tmp_path):
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, "benchmarks/serve_bench.py", "--long-tokens", "300", "--max-tokens", "4",
                          "--batches", "1,2", "--num-cpus", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [key for key in report["batch_scaling"]] == ["1", "2"]
    assert [row["waves"] for row in report["batch_scaling"].values()] == [3, 2]  # at least 3 requests each
    assert all(row["tokens"] == row["requests"] * 4 for row in report["batch_scaling"].values())
    streamed = report["streamed_batch_scaling"]
    assert all(row["tokens"] == row["requests"] * 4 for key, row in streamed.items() if key.isdigit())
    assert all(row["decode_tokens_per_s"] > row["tokens_per_s"] for key, row in streamed.items() if key.isdigit())
    assert len(report["long_prompt_stall"]["short_ttft_s"]) == 4
    assert report["prefix_reuse"]["second"]["tokens"] == 4
    engine = report["server_stats"]["model_replica"]
    assert engine["prefix_cache"]["hits"] == 1 and engine["prefill_tokens"] > 600
    assert set(report["model_step_ceiling"]) == {"1", "2"}
    assert report["settings"]["num_cpus"] == 1
    assert all(row["threads"] == 1 for row in report["model_step_ceiling"].values())  # the replica's threads


def test_rounds_are_averaged_number_by_number():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_bench import mean_result
    rounds = [{"rate": 10.0, "ttfts": [1.0, 3.0], "text": "a", "same": True, "ttft": None},
              {"rate": 20.0, "ttfts": [2.0, 5.0], "text": "b", "same": False, "ttft": 0.5}]
    assert mean_result(rounds) == {"rate": 15.0, "ttfts": [1.5, 4.0], "text": "a", "same": True, "ttft": None}


def test_background_pauses_each_group_of_the_app_and_resumes_it(tmp_path):
    out = tmp_path / "background.json"
    run = subprocess.run([sys.executable, "benchmarks/serve_background.py", "--rounds", "1", "--steps", "2",
                          "--batches", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    groups = json.loads(out.read_text())["groups"]
    assert list(groups) == ["ray core (gcs_server, raylet)", "ray agents (dashboard, runtime env)",
                            "serve controller and proxy", "gateway and registry replicas", "model replica (idle)",
                            "everything"]
    named = [name for group, row in groups.items() if group != "everything" for name in row["processes"]]
    assert len(named) == 9 and set(named) <= set(groups["everything"]["processes"])
    assert all(row["1"]["paused_ms"] > 0 and len(row["1"]["turns"]) == 1 for row in groups.values())
