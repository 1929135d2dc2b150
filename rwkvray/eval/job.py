"""What `rwkvray eval` scores: the job (model, data, states, limits), its states read and checked against the
model, and its rows read from every file."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from rwkvray.errors import UserError
from rwkvray.eval.items import Item, read_items
from rwkvray.eval.metrics import BASE

FINAL_STATE_FILE = "rwkv-final.pth"  # what a run folder's state is
DEFAULT_MAX_TOKENS = 64
DEFAULT_BATCH_SIZE = 16


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
    from rwkvray.files.cache import local_copy
    from rwkvray.model.tuned_state import TunedState
    checkpoint = load_checkpoint(local_copy(job.model))  # memory-mapped: cheap at any size
    states = {BASE: None if checkpoint.time_state is None else TunedState(checkpoint.time_state)}
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

