"""The base of every spec model, and the field types the blocks share."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from rwkvray.spec.paths import existing_file, input_file
from rwkvray.spec.wording import short_repr

TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
GPU_OPS = ("cuda", "fla")


class StrictModel(BaseModel):
    """Unknown keys are errors, values are not coerced (a string is no number), and a validated model is frozen:
    a changed copy is made with model_copy(update=...)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, validate_default=True, protected_namespaces=(), frozen=True
    )


def strict_choice(*values):
    """Reject bools where ints are meant and ints where bools are meant (Literal alone lets 1 == True pass)."""

    def check(value):
        if any(value == v and type(value) is type(v) for v in values):
            return value
        spelled = [short_repr(v) for v in values]
        expected = ", ".join(spelled[:-1]) + " or " + spelled[-1]
        raise PydanticCustomError("literal_error", "bad choice", {"expected": expected})

    return BeforeValidator(check)


def unique_targets(targets: list[str]) -> list[str]:
    for target in targets:
        if targets.count(target) > 1:
            raise ValueError(f"{target!r} is listed twice")
    return targets


ExistingFile = Annotated[str, AfterValidator(existing_file)]
InputFile = Annotated[str, AfterValidator(input_file)]  # a local file, or a URI the workers download
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Target = Literal["att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"]
Targets = Annotated[list[Target], Field(min_length=1), AfterValidator(unique_targets)]
