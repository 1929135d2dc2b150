import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run_writes_rows_with_positive_throughput(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "benchmarks/state_tune_bench.py", "--smoke", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["command"].endswith(f"--smoke --json {out}")
    assert {"gpu", "date", "torch"} <= report.keys()
    rows = report["rows"]
    assert [(r["batch"], r["seq_len"], r["grad_cp"]) for r in rows] == [
        (1, 64, False), (1, 64, True), (2, 32, False), (2, 32, True)]
    for row in rows:
        assert row["status"] == "ok" and row["op"] == "torch"
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0
        assert 0 < row["loss"] < 20
        assert row["ceiling_tok_s"] > 0
        assert row["pct_of_ceiling"] == pytest.approx(100 * row["tokens_per_s"] / row["ceiling_tok_s"])
        assert "graph_status" not in row
    assert "ceiling smoke 1x64: " in run.stdout and "% of ceiling" in run.stdout
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_benchmark_without_a_gpu_refuses_in_one_line():
    run = subprocess.run([sys.executable, "benchmarks/state_tune_bench.py", "--sizes", "0.1B"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == "error: the benchmark needs a CUDA GPU; run with --smoke on the CPU\n"


def test_benchmark_cuda_graph_column_is_refused_in_a_smoke_run():
    run = subprocess.run([sys.executable, "benchmarks/state_tune_bench.py", "--smoke", "--cuda-graph"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.endswith("state_tune_bench.py: error: --cuda-graph needs a GPU; leave it out of --smoke runs\n")
