"""The one place where compat reaches into the spec layer: the schema type, its validator and its helpers."""

from rwkvray.spec.config import TARGETS, nested_model, spec_from_dict, strategy_to_deepspeed
from rwkvray.spec.config import JobSpec as TrainSpec

__all__ = ["TARGETS", "TrainSpec", "nested_model", "spec_from_dict", "strategy_to_deepspeed"]
