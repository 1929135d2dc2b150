"""pydantic's validation errors as one line in the spec's own terms: `job.yaml: optim.lr_init: must be > 0`."""

from __future__ import annotations

import difflib
import re
from typing import Any, get_args

from pydantic import BaseModel, ValidationError


class SpecProblem(ValueError):
    """A validation problem at `key`, a dotted path relative to the model that raises it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
    "list": "a list",
}


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel],
                            key_names: dict[str, str] | None = None) -> str:
    """ONE line: `{source}: optim.lr_init: must be > 0`, several problems joined with '; '. `root` is the model
    that was validated (it knows the keys an unknown one may be a misspelling of)."""
    names = key_names or {}
    problems = [f"{names.get(path, path)}: {message}" for path, message in validation_problems(err, root)]
    return f"{source}: " + "; ".join(problems)


def validation_problems(err: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """(dotted key path, message) for each pydantic error, with pydantic's wording replaced by ours."""
    problems = []
    for error in err.errors():
        loc = list(error["loc"])
        problem = (error.get("ctx") or {}).get("error")
        if isinstance(problem, SpecProblem):
            loc += problem.key.split(".")
        path = dotted(loc)
        problems.append((path or "(top level)", describe(error, loc, root)))
    return problems


def dotted(loc: list) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def describe(error: dict, loc: list, root: type[BaseModel]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "value_error":
        problem = ctx.get("error")
        return problem.message if isinstance(problem, SpecProblem) else str(problem)
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key" + suggestion(loc, root)
    if kind == "literal_error":
        return f"must be one of {', '.join(choices(ctx['expected']))} (got {short_repr(error['input'])})"
    bounds = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit:g}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} items"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} items"
    if kind == "finite_number":
        return "must be a finite number"
    for prefix, words in TYPE_WORDS.items():
        if kind in (f"{prefix}_type", f"{prefix}_parsing", f"{prefix}_from_float"):
            return f"must be {words} (got {short_repr(error['input'])})"
    return error["msg"]


def choices(expected: str) -> list[str]:
    """pydantic's "'a', 'b' or 'c'" as ['a', 'b', 'c'], unquoted; True/False written the YAML way."""
    parts = re.split(r", | or ", expected)
    return [{"True": "true", "False": "false"}.get(p.strip("'"), p.strip("'")) for p in parts]


def suggestion(loc: list, root: type[BaseModel]) -> str:
    """' (did you mean X?)' when the unknown key at loc is close to a real one."""
    model: Any = root
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field and nested_model(field.annotation)
        if not model:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = (annotation, *get_args(annotation))
    return next((t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), None)


def short_repr(value: Any) -> str:
    """The value as YAML spells it (true, null), cut to 40 characters."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def yaml_type(value: Any) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)
