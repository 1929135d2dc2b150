"""The one place where compat reaches into the spec layer: the schema type, its validator and its helpers."""

from typing import Any

from rwkvray.spec import TARGETS, TrainSpec, nested_model, spec_from_dict, strategy_to_deepspeed

__all__ = ["TARGETS", "TrainSpec", "default_of", "nested_model", "spec_from_dict", "strategy_to_deepspeed"]


def default_of(path: str) -> Any:
    """The spec's default for the dotted key `path`, e.g. "optim.betas"."""
    model: Any = TrainSpec
    *blocks, key = path.split(".")
    for block in blocks:
        model = nested_model(model.model_fields[block].annotation)
    return model.model_fields[key].get_default(call_default_factory=True)
