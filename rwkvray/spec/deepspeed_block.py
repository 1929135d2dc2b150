"""The deepspeed block: ZeRO stage and offload, given directly or as a Lightning --strategy string, and raw
DeepSpeed settings merged over the generated config (rwkvray/train/deepspeed_config.py builds that config)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import model_validator

from rwkvray.errors import UserError
from rwkvray.spec.fields import StrictModel, strict_choice
from rwkvray.spec.wording import SpecProblem, short_repr

STRATEGY = re.compile(r"deepspeed_stage_([0-3])(_offload)?")
DATA_PARALLEL_STRATEGIES = (
    "auto", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "single_device"
)


def parse_strategy(strategy: str) -> tuple[int, bool]:
    match = STRATEGY.fullmatch(strategy)
    if match:
        return int(match.group(1)), bool(match.group(2))
    if strategy == "deepspeed":  # Lightning's plain "deepspeed" strategy is ZeRO stage 2
        return 2, False
    if strategy in DATA_PARALLEL_STRATEGIES:  # plain data parallel, as ZeRO stage 0
        return 0, False
    raise SpecProblem(
        "strategy",
        f"unknown strategy {strategy!r} (use deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_2_offload, "
        "deepspeed_stage_3, deepspeed_stage_3_offload, deepspeed or ddp)",
    )


def strategy_to_deepspeed(strategy: str) -> tuple[int, bool]:
    """An RWKV-PEFT / Lightning --strategy string as (ZeRO stage, optimizer offload)."""
    try:
        return parse_strategy(strategy)
    except SpecProblem as problem:
        raise UserError(problem.message) from None


OWNED_DEEPSPEED_KEYS = {
    "optimizer": "the optim block",
    "scheduler": "the optim block",
    "train_batch_size": "trainer.micro_bsz and trainer.grad_accum",
    "train_micro_batch_size_per_gpu": "trainer.micro_bsz",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.stage",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
}


def owned_keys(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Keys of a raw DeepSpeed config that other spec blocks own, with the spec key to use instead."""
    found = []
    for path, owner in OWNED_DEEPSPEED_KEYS.items():
        node: Any = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            found.append((path, owner))
    return found


class DeepSpeedBlock(StrictModel):
    stage: Annotated[Literal[0, 1, 2, 3], strict_choice(0, 1, 2, 3)] = 1
    offload: bool = False  # ZeRO-Offload of the optimizer to CPU memory
    config: dict[str, Any] | None = None  # raw DeepSpeed config merged over the generated one

    @model_validator(mode="before")
    @classmethod
    def from_strategy(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "strategy" not in data:
            return data
        data = dict(data)
        strategy = data.pop("strategy")
        for key in ("stage", "offload"):
            if key in data:
                raise SpecProblem(key, "set either strategy or stage/offload, not both")
        if not isinstance(strategy, str):
            raise SpecProblem("strategy", f"must be a string (got {short_repr(strategy)})")
        data["stage"], data["offload"] = parse_strategy(strategy)
        return data

    @model_validator(mode="after")
    def legal(self) -> DeepSpeedBlock:
        if self.offload and self.stage == 0:
            raise SpecProblem("offload", "needs stage 1, 2 or 3 (stage 0 has no ZeRO optimizer to offload)")
        owned = owned_keys(self.config or {})
        if owned:
            path, owner = owned[0]
            raise SpecProblem(f"config.{path}", f"not allowed here: set {owner} instead")
        return self
