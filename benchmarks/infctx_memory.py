"""Peak memory of one long-document training step (`--train_type infctx`) on the CPU, by ctx_len.

One step is what state tuning does with trainer.chunk_ctx: forward from the tuned state in chunks of
--chunk-ctx tokens, the loss, backward (each chunk recomputed, the gradient flowing through every chunk boundary
back to the state). A ctx_len no longer than the chunk runs unchunked: that is the reference row. Each ctx_len
runs in a fresh process, one thread, with glibc told to give every freed buffer of 64 KiB or more back to the
system (MALLOC_MMAP_THRESHOLD_), so that the peak is what the step holds at once, not what the allocator kept;
the figure is the step's rise in peak RSS (ru_maxrss after the step minus before it, with the model and batch
already built), plus the process's whole peak. Rows without chunks, up to --unchunked-up-to, show what the
chunks save.

    python benchmarks/infctx_memory.py                                   # ctx_len 256, 1k, 4k, 16k; chunk 256
    python benchmarks/infctx_memory.py --ctx-lens 256,4096 --json out.json
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys

import torch

from rwkvray.model.init import default_dims
from rwkvray.model.long_context import Chunking
from rwkvray.model.rwkv import RWKV
from rwkvray.peft.base import PeftModel
from rwkvray.peft.state import StateTuning
from rwkvray.model.tuned_state import TunedState


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_step(ctx_len: int, chunk_ctx: int, n_layer: int, n_embd: int, vocab: int) -> dict:
    """One forward and backward in this process; the rise in peak RSS it causes."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dims = default_dims(n_layer, n_embd, vocab)
    chunking = Chunking(chunk_ctx) if ctx_len > chunk_ctx else None
    base = RWKV(dims, "torch")
    with torch.no_grad():  # random weights, so that the state's gradient is not zero (RWKV-LM inits output at 0)
        for p in base.parameters():
            p.normal_(0.0, 0.5 if p.dim() < 2 else p.shape[-1] ** -0.5)
    model = PeftModel(base, [StateTuning(TunedState(torch.zeros(n_layer, *dims.state_shape)))], chunking)
    tokens = torch.randint(0, vocab, (1, ctx_len + 1))
    inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], torch.ones(1, ctx_len)
    before = peak_rss_mib()
    model(inputs, targets, mask).backward()
    after = peak_rss_mib()
    assert model.methods[0].time_state.grad.abs().sum() > 0
    return {"ctx_len": ctx_len, "chunk_ctx": chunk_ctx if chunking else None, "step_peak_mib": round(after - before, 1),
            "process_peak_mib": round(after, 1)}


def measure(ctx_len: int, chunk_ctx: int, n_layer: int, n_embd: int, vocab: int) -> dict:
    """one_step in a fresh process, so that each peak is its own."""
    command = [sys.executable, __file__, "--one", str(ctx_len), "--chunk-ctx", str(chunk_ctx),
               "--n-layer", str(n_layer), "--n-embd", str(n_embd), "--vocab", str(vocab)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx-lens", default="256,1024,4096,16384")
    parser.add_argument("--chunk-ctx", type=int, default=256)
    parser.add_argument("--unchunked-up-to", type=int, default=4096, help="also run these ctx_lens without chunks")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure this ctx_len here
    args = parser.parse_args(argv)
    model = (args.n_layer, args.n_embd, args.vocab)
    if args.one:
        print(json.dumps(one_step(args.one, args.chunk_ctx, *model)))
        return 0
    ctx_lens = [int(n) for n in args.ctx_lens.split(",")]
    rows = [measure(n, args.chunk_ctx, *model) for n in ctx_lens]
    rows += [measure(n, n, *model) for n in ctx_lens if args.chunk_ctx < n <= args.unchunked_up_to]
    reference = rows[0]["step_peak_mib"]
    print(f"model: {args.n_layer} layers x {args.n_embd}, vocab {args.vocab}, fp32, batch 1, CPU (1 thread); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'ctx_len':>8} {'chunk':>6} {'step peak MiB':>14} {'x first row':>12} {'process peak MiB':>17}")
    for row in rows:
        print(f"{row['ctx_len']:>8} {row['chunk_ctx'] or '-':>6} {row['step_peak_mib']:>14.1f} "
              f"{row['step_peak_mib'] / reference:>12.2f} {row['process_peak_mib']:>17.1f}")
    if args.json:
        meta = {"model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab": args.vocab, "dtype": "fp32"},
                "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
