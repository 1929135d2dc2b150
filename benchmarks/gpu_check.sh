#!/usr/bin/env bash
# The GPU check in one run (about 5 minutes on an H100, capped at 8): the tests marked gpu, then the benchmark
# (each row also as % of the same-run matmul ceiling), then the batch-1 rows with and without a CUDA graph.
# Run from the repository root on a machine with an NVIDIA GPU. Logs and results go to $OUT.
# FLA is optional: wheels placed in .whl/ (see benchmarks/README.md) are installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# rwkvray itself, offline; without it nothing below can run.
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
    tail -3 "$OUT/install.log"
    echo "pip install -e . failed (full log: $OUT/install.log)"
    exit 1
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import fla, triton; print('fla', fla.__version__, 'triton', triton.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Every test that needs CUDA carries the `gpu` marker (the CPU tests are CI's).
timeout 200 $PY -m pytest -q -rs -p no:cacheprovider -m gpu --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
timeout 190 $PY benchmarks/state_tune_bench.py --ops cuda,fla --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
timeout 60 $PY benchmarks/state_tune_bench.py --sizes 0.1B,0.4B --shapes 1x1024 --ops cuda,fla --cuda-graph \
    --json "$OUT/bench_graph.json" 2>&1 | tee "$OUT/bench_graph.log"
