"""`rwkvray eval`: flags or a spec's eval block -> an EvalJob; the driver reads and checks every row, state and the
model's shape, then one Ray actor (on a GPU when the cluster has one) loads the model and the serving engine and
scores every item from every state while the driver shows its progress; then the table and the files."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from rwkvray.errors import UserError
from rwkvray.files.cache import local_copy
from rwkvray.eval.report import chart_path, comparison_lines, plot, table, write_details, write_json
from rwkvray.eval.items import Item
from rwkvray.eval.job import EvalJob, load_states, read_all_items
from rwkvray.eval.metrics import summarize
from rwkvray.eval.scoring import Record, evaluate, work_units
from rwkvray.launch.ray_session import ray_session
from rwkvray.spec.eval_block import MAX_EVAL_TOKENS, STATE_NAME

PROGRESS_EVERY_S = 30.0  # without a terminal: one progress line this often
FLAGS_ONLY = ("model", "state", "data", "out", "details")


def job_from_flags(args) -> EvalJob:
    if not args.model:
        raise UserError("--model: required (the base checkpoint), or give a spec file with model and eval blocks")
    if not args.data:
        raise UserError("--data: give at least one eval jsonl file")
    if not 1 <= args.max_tokens <= MAX_EVAL_TOKENS:
        raise UserError(f"--max-tokens: must be 1 to {MAX_EVAL_TOKENS} (got {args.max_tokens})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: must be ≥ 1 (got {args.batch_size})")
    if not os.path.isfile(args.model):
        raise UserError(f"--model: {args.model}: no such file")
    for path in args.data:
        if not os.path.isfile(path):
            raise UserError(f"--data: {path}: no such file")
    return EvalJob(args.model, list(args.data), named_states(args.state), args.max_tokens, args.batch_size,
                   args.out, args.details)


def named_states(values: list[str]) -> dict[str, str]:
    states = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise UserError(f"--state {value}: expected NAME=PATH (a state file or a run folder)")
        if name == "base":
            raise UserError(f"--state {value}: 'base' is the base model, always scored; name the state otherwise")
        if not STATE_NAME.fullmatch(name):
            raise UserError(f"--state {value}: invalid name {name!r}: use 1-128 of A-Z a-z 0-9 . _ -")
        if name in states:
            raise UserError(f"--state {value}: the name {name} is given twice")
        states[name] = path
    return states


def job_from_spec(args) -> tuple[EvalJob, str]:
    given = [f"--{flag}" for flag in FLAGS_ONLY if getattr(args, flag)]
    if given:
        raise UserError(f"{given[0]}: give either a spec file or the flags, not both")
    from rwkvray.spec import EvalSpec, load_spec
    spec = load_spec(args.spec, kind=EvalSpec)
    block = spec.eval
    job = EvalJob(spec.model.path, list(block.data), dict(block.states), block.max_tokens, block.batch_size,
                  block.out, block.details)
    return job, f"{spec.source}: eval.states"


def eval_command(args) -> None:
    job, where = job_from_spec(args) if args.spec else (job_from_flags(args), "--state")
    for path in (job.out, job.details):
        if path and os.path.isdir(path):
            raise UserError(f"{path}: is a folder; --out and --details name files")
    results, records = run_eval(job, args.address, where)
    print(table(results))
    for line in comparison_lines(records):
        print(line)
    if job.out:
        write_json(job.out, {"results": results})
        plot(results, chart_path(job.out))
        print(f"wrote {job.out} and {chart_path(job.out)}")
    if job.details:
        write_details(job.details, records)
        print(f"wrote {job.details}")


def run_eval(job: EvalJob, address: Optional[str] = None, where: str = "--state") -> tuple[list[dict], list[Record]]:
    """Check everything here, then score on Ray; the results rows and the per-item records."""
    from rwkvray.text.tokenizer import get_tokenizer
    items = read_all_items(job.data, get_tokenizer())
    states = load_states(job, where)
    with ray_session(address):
        records = evaluate_on_ray(job, items, states)
    return summarize(records), records


class Evaluator:
    """The Ray actor: the model and a serving engine on one device; `evaluate` scores, `progress` counts."""

    def __init__(self, model_path: str, use_gpu: bool, batch_size: int):
        import torch
        from rwkvray.model.rwkv import load_model
        from rwkvray.engine.batch_engine import BatchEngine
        from rwkvray.text.tokenizer import get_tokenizer
        device = torch.device("cuda" if use_gpu else "cpu")
        dtype = torch.bfloat16 if use_gpu else torch.float32
        model, _ = load_model(local_copy(model_path), device, dtype, op="auto")
        self.engine = BatchEngine(model, get_tokenizer(), max_batch_size=batch_size)
        self.done = 0

    async def evaluate(self, items, states, max_tokens: int, batch_size: int) -> list[Record]:
        return await evaluate(self.engine, items, states, max_tokens, batch_size, self.advance)

    def advance(self, units: int) -> None:
        self.done += units

    async def progress(self) -> int:
        return self.done


def evaluate_on_ray(job: EvalJob, items: list[Item], states: dict) -> list[Record]:
    import ray
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    actor_class = ray.remote(num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0)(Evaluator)
    actor = actor_class.remote(job.model, use_gpu, job.batch_size)
    try:
        finished = actor.evaluate.remote(items, states, job.max_tokens, job.batch_size)
        show_progress(lambda: ray.get(actor.progress.remote()), lambda: not ray.wait([finished], timeout=0.5)[0],
                      work_units(items, states), f"{len(items)} items x {len(states)} states")
        return ray.get(finished)
    finally:
        ray.kill(actor)


def show_progress(done, running, total: int, what: str) -> None:
    """A tqdm bar on a terminal, else a line every PROGRESS_EVERY_S, until `running()` turns false."""
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"eval {what}", unit="seq", dynamic_ncols=True)
    print(f"eval: {what}, {total} sequences", file=sys.stderr)
    last_line = time.monotonic()
    while running():
        count = done()
        if bar is not None:
            bar.update(count - bar.n)
        elif time.monotonic() - last_line >= PROGRESS_EVERY_S:
            print(f"eval: {count}/{total} sequences", file=sys.stderr)
            last_line = time.monotonic()
    if bar is not None:
        bar.update(total - bar.n)
        bar.close()
