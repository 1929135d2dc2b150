"""The tune block: the Ray Tune sweep, and the search space checked against what each key accepts.

rwkvray/launch/tune_space.py turns the checked space into Ray Tune's param_space.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from rwkvray.spec.fields import NonNegativeFloat, PositiveFloat, PositiveInt, StrictModel
from rwkvray.spec.wording import SpecProblem, short_repr

TUNABLE_KEYS = {  # tune.space key -> (block, field) it sets in each trial
    "lr_init": ("optim", "lr_init"),
    "lr_final": ("optim", "lr_final"),
    "warmup_steps": ("optim", "warmup_steps"),
    "ctx_len": ("data", "ctx_len"),
}
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")


class SchedulerConfig(StrictModel):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1  # in reports (one every tune.eval_every_steps steps)
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    max_t: PositiveInt | None = None  # in reports; None: the whole run

    @model_validator(mode="after")
    def ordered(self) -> SchedulerConfig:
        if self.max_t is not None and self.max_t < self.grace_period:
            raise SpecProblem("max_t", f"must be ≥ grace_period ({self.grace_period})")
        return self


EVAL_METRICS = ("mc_acc", "exact", "contains", "loss")  # what an eval file reports (rwkvray/eval/items.py)


class TuneConfig(StrictModel):
    metric: str = "val_loss"  # val_loss, train_loss or eval/<file>/<metric> (scored on the eval block's data)
    mode: Literal["min", "max"] = "min"
    num_samples: PositiveInt = 4
    max_concurrent_trials: PositiveInt = 2
    gpus_per_trial: NonNegativeFloat = 0.0
    cpus_per_trial: PositiveFloat = 1.0
    space: dict[str, dict[str, list]]  # {lr_init: {loguniform: [1e-3, 1e-1]}}; randint's high is exclusive
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    eval_every_steps: PositiveInt = 10

    @field_validator("space", mode="before")
    @classmethod
    def search_space(cls, space: Any) -> Any:
        if not isinstance(space, dict):
            raise ValueError(f"must be a mapping (got {short_repr(space)})")
        if not space:
            raise ValueError(f"must name at least one of {', '.join(TUNABLE_KEYS)}")
        return {key: parse_distribution(key, value) for key, value in space.items()}

    @field_validator("metric")
    @classmethod
    def known_metric(cls, metric: str) -> str:
        parts = metric.split("/")
        if metric in ("val_loss", "train_loss") or (len(parts) == 3 and parts[0] == "eval" and parts[1]
                                                     and parts[2] in EVAL_METRICS):
            return metric
        raise ValueError(f"must be val_loss, train_loss or eval/<file>/<metric> with metric one of "
                         f"{', '.join(EVAL_METRICS)} (got {metric!r})")

    @field_validator("gpus_per_trial")
    @classmethod
    def whole_above_one(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError("above 1 it must be a whole number (Ray shares only fractions of one GPU)")
        return gpus


def parse_distribution(key: str, value: Any) -> dict[str, list]:
    """One search-space entry as {kind: args}, checked against what `key` accepts."""
    if key not in TUNABLE_KEYS:
        raise SpecProblem(key, f"not tunable (use {', '.join(TUNABLE_KEYS)})")
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecProblem(key, "must be one distribution, e.g. {loguniform: [1e-3, 1e-1]}")
    (kind, args), = value.items()
    if kind not in DISTRIBUTIONS:
        raise SpecProblem(key, f"unknown distribution {kind!r} (use {', '.join(DISTRIBUTIONS)})")
    is_lr = key.startswith("lr_")
    if is_lr and kind == "randint":
        raise SpecProblem(key, "randint gives integers; use loguniform, uniform or choice")
    if not is_lr and kind in ("loguniform", "uniform"):
        raise SpecProblem(key, f"{kind} gives fractions; use randint or choice")
    if not isinstance(args, list) or not args:
        raise SpecProblem(key, f"{kind} needs a non-empty list")
    number = (int, float) if is_lr else int
    if any(isinstance(a, bool) or not isinstance(a, number) for a in args):
        raise SpecProblem(key, f"{kind} values must be {'numbers' if is_lr else 'integers'} (got {args})")
    if kind != "choice" and (len(args) != 2 or not args[0] < args[1]):
        raise SpecProblem(key, f"{kind} needs [low, high] with low < high (got {args})")
    minimum = {"lr_init": 0, "lr_final": 0, "warmup_steps": 0, "ctx_len": 2}[key]
    if is_lr and min(args) <= 0:
        raise SpecProblem(key, f"learning rates must be > 0 (got {args})")
    if min(args) < minimum:
        raise SpecProblem(key, f"values must be ≥ {minimum} (got {args})")
    return {kind: list(args)}


def sampled_range(distribution: dict[str, list] | None, fixed: float) -> tuple[float, float]:
    if distribution is None:
        return fixed, fixed
    (kind, args), = distribution.items()
    if kind == "randint":
        return args[0], args[1] - 1
    return min(args), max(args)
