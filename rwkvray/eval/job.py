"""`rwkvray eval` on Ray: the driver reads and checks every row, state and the model's shape, then one Ray actor
(on a GPU when the cluster has one) loads the model and the serving engine and scores every item from every
state, while the driver shows its progress."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from rwkvray.errors import UserError
from rwkvray.eval.items import Item, read_items
from rwkvray.eval.metrics import BASE, summarize
from rwkvray.eval.scoring import Record, evaluate, work_units

FINAL_STATE_FILE = "rwkv-final.pth"  # what a run folder's state is
DEFAULT_MAX_TOKENS = 64
DEFAULT_BATCH_SIZE = 16
PROGRESS_EVERY_S = 30.0  # without a terminal: one progress line this often


@dataclass
class EvalJob:
    """What to evaluate, as the command line or a spec's eval block gives it."""
    model: str
    data: list[str]
    states: dict[str, str] = field(default_factory=dict)  # name -> state file or run folder
    max_tokens: int = DEFAULT_MAX_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    out: Optional[str] = None
    details: Optional[str] = None


def state_file(path: str, where: str) -> str:
    """A state file, or a run folder's final state."""
    if os.path.isdir(path):
        final = os.path.join(path, FINAL_STATE_FILE)
        if not os.path.isfile(final):
            raise UserError(f"{where}: {path} is a folder without {FINAL_STATE_FILE} (give a state file or a "
                            "finished run's folder)")
        return final
    if not os.path.isfile(path):
        raise UserError(f"{where}: {path}: no such state file or run folder")
    return path


def load_states(job: EvalJob, where: str) -> dict:
    """base (the model file's own merged state, if any) first, then the named states, checked against the model."""
    from rwkvray.model.checkpoint import load_checkpoint
    from rwkvray.model.state_file import load_state
    checkpoint = load_checkpoint(job.model)  # memory-mapped: cheap at any size
    states = {BASE: checkpoint.time_state}
    for name, path in job.states.items():
        if name == BASE:
            raise UserError(f"{where}: the state name 'base' is taken by the base model (it is always scored)")
        states[name] = load_state(state_file(path, where), checkpoint.dims)
    return states


def read_all_items(paths: list[str], tokenizer) -> list[Item]:
    names = [os.path.basename(path) for path in paths]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated:
        raise UserError(f"eval data: two files are named {repeated} (results name a file by its name)")
    return [item for path in paths for item in read_items(path, tokenizer)]


def run_eval(job: EvalJob, address: Optional[str] = None, where: str = "--state") -> tuple[list[dict], list[Record]]:
    """Check everything here, then score on Ray; the results rows and the per-item records."""
    from rwkvray.text.tokenizer import get_tokenizer
    items = read_all_items(job.data, get_tokenizer())
    states = load_states(job, where)
    from rwkvray.launch.ray_session import ray_session
    with ray_session(address):
        records = evaluate_on_ray(job, items, states)
    return summarize(records), records


class Evaluator:
    """The Ray actor: the model and a serving engine on one device; `evaluate` scores, `progress` counts."""

    def __init__(self, model_path: str, use_gpu: bool, batch_size: int):
        import torch
        from rwkvray.model.rwkv import load_model
        from rwkvray.serve.batch_engine import BatchEngine
        from rwkvray.text.tokenizer import get_tokenizer
        device = torch.device("cuda" if use_gpu else "cpu")
        dtype = torch.bfloat16 if use_gpu else torch.float32
        model, _ = load_model(model_path, device, dtype, op="auto")
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
