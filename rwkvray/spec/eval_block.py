"""The eval block: what `rwkvray eval SPEC` scores (a spec of `model:` and `eval:` alone, so a Ray job can run it)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator

from rwkvray.spec.fields import ExistingFile, PositiveInt, StrictModel
from rwkvray.spec.paths import absolute

STATE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MAX_EVAL_TOKENS = 4096


class EvalConfig(StrictModel):
    data: Annotated[list[ExistingFile], Field(min_length=1)]  # eval jsonl files (rows: see rwkvray/eval/items.py)
    # name: a state file or a run folder (its rwkv-final.pth)
    states: dict[str, Annotated[str, AfterValidator(absolute)]] = Field(default_factory=dict)
    max_tokens: Annotated[int, Field(ge=1, le=MAX_EVAL_TOKENS)] = 64  # per generation row
    batch_size: PositiveInt = 16  # sequences per forward, and rows the engine decodes together
    out: Annotated[str, AfterValidator(absolute)] | None = None  # results JSON (the PNG chart goes beside it)
    details: Annotated[str, AfterValidator(absolute)] | None = None  # per-item jsonl

    @field_validator("states")
    @classmethod
    def state_names(cls, states: dict[str, str]) -> dict[str, str]:
        for name in states:
            if name == "base":
                raise ValueError("'base' is the base model, always scored; name the states otherwise")
            if not STATE_NAME.fullmatch(name):
                raise ValueError(f"invalid state name {name!r}: use 1-128 of A-Z a-z 0-9 . _ -")
        return states
