"""State-tuning speed and memory on one GPU, compared with the goals of docs/perf-targets.md.

One step is what training does: forward (model.features) from the tuned state, chunked cross-entropy over the
65536-way head, backward, and AdamW on the state only; every weight is frozen. 3 warm-up steps, then 10 timed.
tokens/s = B*T*steps / wall time; peak = torch.cuda.max_memory_allocated over the timed steps (no CUDA context).
Each row is also given as a percentage of a ceiling measured in the same run on the same GPU: the frozen model's
matmuls alone through cuBLAS (forward, activation backward, head), timed the same way. `--cuda-graph` adds the
same step captured once in a CUDA graph and replayed (rwkvray/train/graphed_engine.py, `trainer.cuda_graph: true`).

    python benchmarks/state_tune_bench.py --json benchmarks/results/<date>-<gpu>.json     # the goal table's rows
    python benchmarks/state_tune_bench.py --sizes 1.5B --shapes 8x1024 --ops cuda,fla,torch --grad-cp both
    python benchmarks/state_tune_bench.py --sizes 0.1B --shapes 1x1024 --cuda-graph         # launch overhead
    python benchmarks/state_tune_bench.py --smoke --json /tmp/smoke.json                   # CPU, seconds, no GPU
"""
import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkvray.model.dims import ModelDimsX070
from rwkvray.model.init import default_dims
from rwkvray.errors import UserError
from rwkvray.model.loss import masked_lm_loss
from rwkvray.model.rwkv import RWKV
from rwkvray.model.rwkv7 import TimeMix
from rwkvray.peft.state import from_time_state

VOCAB = 65536
HEAD_SIZE = 64
# n_layer, n_embd of the released models; default_dims gives their low-rank dims (64/64/32/128 at 768 …)
SIZES = {"0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "2.9B": (32, 2560)}
SMOKE_DIMS = ModelDimsX070(n_layer=2, n_embd=128, head_size=HEAD_SIZE, vocab_size=1024, dim_w=32, dim_a=32, dim_v=32,
                       dim_g=32)
SMOKE_SHAPES = [(1, 64), (2, 32)]


@dataclass(frozen=True)
class Target:
    peer_cuda: float     # tok/s of RWKV-PEFT with its CUDA op
    peer_fla: float      # tok/s of RWKV-PEFT with FLA
    peer_peak_gb: float
    goal: float          # our goal, tok/s
    goal_peak_gb: float


# docs/perf-targets.md: the peer measured 2026-11-22 on one "NVIDIA H100 80GB HBM3", grad_cp=1, bf16.
TARGET_GPU = "H100"
TARGETS = {
    ("0.1B", 1, 1024): Target(8_874, 6_657, 0.96, 50_000, 0.9),
    ("0.4B", 1, 1024): Target(4_501, 3_550, 1.47, 20_000, 1.4),
    ("1.5B", 1, 1024): Target(4_448, 2_867, 3.75, 15_000, 3.4),
    ("2.9B", 1, 1024): Target(3_640, 2_368, 7.18, 10_000, 6.6),
    ("0.1B", 8, 1024): Target(86_980, 53_135, 6.42, 250_000, 2.5),
    ("0.4B", 8, 1024): Target(35_859, 25_080, 5.34, 100_000, 3.5),
    ("1.5B", 8, 1024): Target(21_866, 18_811, 8.00, 55_000, 6.0),
    ("2.9B", 8, 1024): Target(13_134, 12_188, 11.87, 30_000, 9.5),
    ("1.5B", 4, 4096): Target(18_479, 20_135, 14.43, 55_000, 10.0),
}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU; run with --smoke on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    comparable = TARGET_GPU in gpu
    rows = []
    for size, dims, shapes in plan(args):
        model = build_model(dims, device, torch.float32 if args.smoke else torch.bfloat16)
        for (batch, seq_len) in shapes:
            ceiling = matmul_ceiling(model, batch, seq_len, args.warmup, args.steps)
            for op in args.ops:
                for grad_cp in args.grad_cp:
                    row = {"size": size, "n_layer": dims.n_layer, "n_embd": dims.n_embd, "batch": batch,
                           "seq_len": seq_len, "op": op, "grad_cp": grad_cp, "warmup": args.warmup,
                           "steps": args.steps, "ceiling_tok_s": ceiling}
                    row.update(measure(model, op, grad_cp, batch, seq_len, args.warmup, args.steps))
                    if args.cuda_graph:
                        graphed = measure(model, op, grad_cp, batch, seq_len, args.warmup, args.steps, graph=True)
                        row.update({f"graph_{key}": value for key, value in graphed.items()})
                    row.update(of_ceiling(row))
                    row.update(compare(size, batch, seq_len, op, row, comparable))
                    rows.append(row)
                    print(format_row(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fla": fla_version(),
        "command": shlex.join(["python"] + sys.argv if argv is None else ["python", __file__, *argv]),
        "smoke": args.smoke,
        "comparable_to_targets": comparable,
        "rows": rows,
    }
    print_table(report)
    if args.json:
        write_json(Path(args.json), report)
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=csv(SIZES), help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--shapes", type=shapes_arg, help="comma list of BxT, e.g. 1x1024,8x1024,4x4096")
    parser.add_argument("--ops", type=csv(("cuda", "fla", "torch")), default=["cuda", "fla"],
                        help="WKV backends to time (default cuda,fla; torch is slow at these sizes)")
    parser.add_argument("--grad-cp", choices=("on", "off", "both"), default="on",
                        help="recompute each block in backward (the peer ran with it on)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time each row's step captured in a CUDA graph and replayed")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on the CPU with op torch, 1 warm-up and 2 timed steps: checks the script")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.cuda_graph and args.smoke:
        parser.error("--cuda-graph needs a GPU; leave it out of --smoke runs")
    args.grad_cp = {"on": [True], "off": [False], "both": [False, True]}[args.grad_cp]
    if args.smoke:
        args.ops, args.warmup, args.steps = ["torch"], 1, 2
        args.grad_cp = [False, True]
    return args


def csv(allowed):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
        return items
    return parse


def shapes_arg(text):
    try:
        return [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxT items such as 8x1024") from None


def plan(args):
    """(size name, dims, [(B, T)]): the goal table's rows unless --sizes or --shapes narrow or widen them."""
    if args.smoke:
        return [("smoke", SMOKE_DIMS, SMOKE_SHAPES)]
    result = []
    for size in args.sizes or list(SIZES):
        if args.sizes is None and args.shapes is None:
            shapes = [(b, t) for (s, b, t) in TARGETS if s == size]
        else:
            shapes = args.shapes or [(1, 1024), (8, 1024), (4, 4096)]
        result.append((size, default_dims(*SIZES[size], vocab_size=VOCAB, head_size=HEAD_SIZE), shapes))
    return result


def build_model(dims: ModelDimsX070, device: torch.device, dtype: torch.dtype) -> RWKV:
    """Built in `dtype` straight on the device (a 2.9B model never passes through the CPU), random and frozen."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = RWKV(dims)
    finally:
        torch.set_default_dtype(default)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # LayerNorm and GroupNorm
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif name.endswith(".weight"):  # Linear [out, in] and the embedding: unit-scale outputs
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif p.shape[0] == 1:  # [1, 1, C] mixes and biases
                p.normal_(0.0, 0.5)
            else:  # LoRA matrices used as x @ A, and r_k
                p.normal_(0.0, p.shape[0] ** -0.5)
    return model.requires_grad_(False)


def with_backend(model: RWKV, op: str, grad_cp: bool) -> RWKV:
    """The same weights (shared, not copied) on another WKV backend and recompute setting."""
    with torch.device("meta"):
        twin = RWKV(model.dims, op, grad_cp)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.requires_grad_(False)


def measure(model: RWKV, op: str, grad_cp: bool, batch: int, seq_len: int, warmup: int, steps: int,
            graph: bool = False) -> dict:
    """One row: eager steps, or (graph) the same step captured once and replayed."""
    dims = model.dims
    device = model.head.weight.device
    model = with_backend(model, op, grad_cp)
    time_state = torch.nn.Parameter(torch.zeros(dims.n_layer, *dims.state_shape, device=device))
    lr = torch.tensor(1e-3, device=device) if graph else 1e-3  # a captured step reads lr from a tensor
    optimizer = torch.optim.AdamW([time_state], lr=lr, capturable=graph)
    generator = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(0, dims.vocab_size, (batch, seq_len + 1), device=device, generator=generator)
    mask = torch.ones(batch, seq_len, device=device)

    def loss_fn(input_ids, targets, mask):
        state = from_time_state(time_state, batch, dims.n_embd, dtype=model.head.weight.dtype)
        hidden = model.features(input_ids, state)
        return masked_lm_loss(hidden, model.head, targets, mask)

    def eager_step():
        loss = loss_fn(tokens[:, :-1], tokens[:, 1:], mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    cuda = device.type == "cuda"
    try:
        step = graphed_step(loss_fn, time_state, optimizer, tokens, mask) if graph else eager_step
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom"}
    except UserError as error:
        return {"status": f"error: {error}"}
    except Exception as error:  # a failing backend (say a Triton compile error) must not cost the other rows
        first_line = (str(error).strip().splitlines() or [""])[0]
        return {"status": f"error: {type(error).__name__}: {first_line}"}
    return {
        "status": "ok",
        "tokens_per_s": batch * seq_len * steps / wall,
        "step_ms": 1000 * wall / steps,
        "peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "loss": loss.item(),
    }


def graphed_step(loss_fn, time_state, optimizer, tokens, mask):
    """The step captured once (with its own warm-up), as a function that replays it."""
    from rwkvray.train.graphed_engine import GraphedStep
    inputs = (tokens[:, :-1], tokens[:, 1:], mask)
    replay = GraphedStep(loss_fn, [time_state], optimizer, inputs)
    return lambda: replay(*inputs)


def matmul_ceiling(model: RWKV, batch: int, seq_len: int, warmup: int, steps: int) -> float:
    """tok/s of the frozen model's matmuls alone, each through cuBLAS at the row's token count: forward
    (x W) and activation backward (dy W^T) of every projection and low-rank factor, and of the head. No weight
    gradients (frozen), no WKV, no norms: no step of this model can be faster on this GPU."""
    weights = [module.weight.t() for module in model.modules() if isinstance(module, torch.nn.Linear)]
    for mix in (m for m in model.modules() if isinstance(m, TimeMix)):
        low_rank = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")  # layer 0 has no v1, v2
        weights += [getattr(mix, name) for name in low_rank if hasattr(mix, name)]
    tokens = batch * seq_len
    device, dtype = model.head.weight.device, model.head.weight.dtype
    inputs = {n: torch.randn(tokens, n, device=device, dtype=dtype) for n in {w.shape[0] for w in weights}}
    grads = {n: torch.randn(tokens, n, device=device, dtype=dtype) for n in {w.shape[1] for w in weights}}

    def matmuls():
        for w in weights:
            torch.mm(inputs[w.shape[0]], w)
            torch.mm(grads[w.shape[1]], w.t())

    for _ in range(warmup):
        matmuls()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        matmuls()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens * steps / (time.perf_counter() - start)


def of_ceiling(row) -> dict:
    """Each throughput of the row as a percentage of the same-run matmul ceiling."""
    return {f"{prefix}pct_of_ceiling": 100 * row[f"{prefix}tokens_per_s"] / row["ceiling_tok_s"]
            for prefix in ("", "graph_") if row.get(f"{prefix}status") == "ok"}


def compare(size, batch, seq_len, op, row, comparable) -> dict:
    """The goal and the peer's figure for this row; verdicts only on the GPU model the targets were taken on."""
    target = TARGETS.get((size, batch, seq_len))
    if target is None:
        return {"goal_tok_s": None}
    peer = {"cuda": target.peer_cuda, "fla": target.peer_fla}.get(op)
    result = {"goal_tok_s": target.goal, "goal_peak_gb": target.goal_peak_gb, "peer_tok_s": peer,
              "peer_peak_gb": target.peer_peak_gb}
    if row["status"] == "ok" and comparable:
        result["x_goal"] = row["tokens_per_s"] / target.goal
        result["x_peer"] = row["tokens_per_s"] / peer if peer else None
        result["meets_goal"] = row["tokens_per_s"] >= target.goal and row["peak_alloc_gb"] <= target.goal_peak_gb
    return result


def format_row(row) -> str:
    head = f"{row['size']:>5} {row['batch']}x{row['seq_len']:<5} {row['op']:>5} cp={'on ' if row['grad_cp'] else 'off'}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    peak = f"{row['peak_alloc_gb']:6.2f} GB" if row["peak_alloc_gb"] is not None else "    n/a"
    text = (f"{head} {row['tokens_per_s']:>10,.0f} tok/s {row['pct_of_ceiling']:5.1f}% of ceiling "
            f"{row['step_ms']:9.1f} ms/step  peak {peak}")
    if "graph_status" in row:
        text += (f"  graph {row['graph_tokens_per_s']:>10,.0f} tok/s {row['graph_pct_of_ceiling']:5.1f}%"
                 if row["graph_status"] == "ok" else f"  graph {row['graph_status']}")
    if row.get("goal_tok_s"):
        text += f"  goal {row['goal_tok_s']:>7,.0f} tok/s {row['goal_peak_gb']:5.1f} GB"
        if "meets_goal" in row:
            peer = f" x{row['x_peer']:.2f} peer" if row["x_peer"] else ""
            text += f"  x{row['x_goal']:.2f} goal{peer}  {'MEETS GOAL' if row['meets_goal'] else 'below goal'}"
    return text


def print_table(report):
    print(f"\n{report['gpu']}, torch {report['torch']}, CUDA {report['cuda']}, fla {report['fla']}, {report['date']}")
    ceilings = {(r["size"], r["batch"], r["seq_len"]): r["ceiling_tok_s"] for r in report["rows"]}
    for (size, batch, seq_len), ceiling in ceilings.items():
        print(f"ceiling {size} {batch}x{seq_len}: {ceiling:,.0f} tok/s (frozen matmuls only, same run)")
    if not report["comparable_to_targets"]:
        print(f"the targets were measured on an {TARGET_GPU}: no verdicts on this device")
    for row in report["rows"]:
        print(format_row(row))


def fla_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fla-core")
    except PackageNotFoundError:
        return None


def write_json(path: Path, report: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
