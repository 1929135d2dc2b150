"""What an idle rwkvray Serve app's processes cost the model's step on the same node.

Starts the local app of serve_bench.py (Ray, Serve, the gateway, the registry and one model replica), sends it
no requests, and times bare `model.step` in this process with the model replica's torch threads, first with
every process of the app running, then with one group of them paused (SIGSTOP, then SIGCONT), taking turns
group by group and round by round, so a host whose speed drifts is measured the same way on both sides. A
group's figure is the share of the step's time that pausing it saved (the median over the rounds).

    python benchmarks/serve_background.py --n-layer 12 --n-embd 768 --json benchmarks/results/serve-background.json

Only the processes of the Ray instance this script starts are paused, and each is resumed before the next turn.
"""
import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time

import psutil
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rwkvray.files.atomic import write_bytes_atomically  # noqa: E402
from serve_bench import random_checkpoint, start_local_app  # noqa: E402

# process name fragments of each group, as Ray 2.58 names its processes
GROUPS = {
    "ray core (gcs_server, raylet)": ("gcs_server", "raylet"),
    "ray agents (dashboard, runtime env)": ("DashboardAgent", "RuntimeEnvAgent"),
    "serve controller and proxy": ("ServeController", "ProxyActor"),
    "gateway and registry replicas": ("rwkvray:Gateway", "rwkvray:StateRegistry"),
    "model replica (idle)": ("rwkvray:StateModel",),
}
SETTLE_S = 0.2  # after a pause or a resume, before timing


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the random model")
    parser.add_argument("--n-embd", type=int, default=256, help="width of the random model")
    parser.add_argument("--batches", default="1,8", help="batch sizes of the timed step")
    parser.add_argument("--steps", type=int, default=20, help="steps timed per turn")
    parser.add_argument("--rounds", type=int, default=5, help="turns per group and batch size")
    parser.add_argument("--json", help="where to write the results (default: benchmarks/results/"
                        "serve-background-<date>.json)")
    return parser.parse_args()


def app_processes() -> dict[str, list[psutil.Process]]:
    """This process's descendants (the Ray instance it started) by group, with "everything" as the last."""
    processes = psutil.Process().children(recursive=True)
    names = {process: process.name() for process in processes}
    groups = {group: [p for p in processes if any(part in names[p] for part in parts)]
              for group, parts in GROUPS.items()}
    groups["everything"] = processes
    return groups


def signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def step_ms(model, batch: int, steps: int) -> float:
    from rwkvray.model.rwkv import RNNState
    with torch.inference_mode():
        state, tokens = RNNState.zeros(model.dims, batch), torch.zeros(batch, dtype=torch.long)
        model.step(tokens, state)
        start = time.perf_counter()
        for _ in range(steps):
            model.step(tokens, state)
        return (time.perf_counter() - start) / steps * 1000


def paused_turn(model, batch: int, steps: int, processes: list[psutil.Process]) -> tuple[float, float]:
    """(ms with the processes running, ms with them paused)."""
    running = step_ms(model, batch, steps)
    signal_all(processes, signal.SIGSTOP)
    try:
        time.sleep(SETTLE_S)
        paused = step_ms(model, batch, steps)
    finally:
        signal_all(processes, signal.SIGCONT)
    time.sleep(SETTLE_S)
    return running, paused


def measure(model, groups: dict, batches: list[int], steps: int, rounds: int) -> dict:
    turns = {(group, batch): [] for group in groups for batch in batches}
    for turn in range(rounds):
        for group, processes in groups.items():
            for batch in batches:
                turns[group, batch].append(paused_turn(model, batch, steps, processes))
        print(f"round {turn + 1}/{rounds} done", flush=True)
    out = {}
    for group, processes in groups.items():
        out[group] = {"processes": sorted(p.name() for p in processes)}
        for batch in batches:
            pairs = turns[group, batch]
            out[group][str(batch)] = {
                "running_ms": statistics.median(r for r, _ in pairs), "paused_ms": statistics.median(p for _, p in pairs),
                "saved_percent": statistics.median(100 * (r - p) / r for r, p in pairs), "turns": pairs}
    return out


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    from ray import serve
    import ray
    from rwkvray.model.rwkv import load_model
    with tempfile.TemporaryDirectory(prefix="serve-background-") as folder:
        model_path = os.path.join(folder, "model.pth")
        random_checkpoint(args.n_layer, args.n_embd, model_path)
        app_args = argparse.Namespace(n_layer=args.n_layer, n_embd=args.n_embd, stream_interval_ms=None,
                                      stream_chunks_per_s=None, num_cpus=None, max_tokens=64, long_tokens=1500,
                                      prefill_chunk=256)
        _, _, _, threads = start_local_app(app_args, folder, model_path)
        try:
            torch.set_num_threads(threads)
            model, _ = load_model(model_path)
            groups = app_processes()
            result = {"threads": threads, "steps": args.steps, "rounds": args.rounds,
                      "groups": measure(model, groups, batches, args.steps, args.rounds)}
        finally:
            serve.shutdown()
            ray.shutdown()
    result["model"] = {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab": 65536, "dtype": "fp32"}
    result["host"] = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["command"] = " ".join(["python", *sys.argv])
    for group, row in result["groups"].items():
        figures = ", ".join(f"batch {b}: {row[str(b)]['saved_percent']:.1f}% "
                            f"({row[str(b)]['running_ms']:.1f} -> {row[str(b)]['paused_ms']:.1f} ms)" for b in batches)
        print(f"pausing {group} ({len(row['processes'])} processes): {figures}")
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"serve-background-{time.strftime('%Y-%m-%d')}.json")
    write_bytes_atomically(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
