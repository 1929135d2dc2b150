"""`rwkvray convert-flags`: the YAML job spec that says what an RWKV-PEFT command line says.

The spec holds the keys the flags set, with the values as the flags give them (paths as typed, so the file
works from the folder the command ran in), in the schema's order. Keys no flag set keep the spec's defaults.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from rwkvray.compat.rwkv_peft import TrainFlags
from rwkvray.compat.spec_api import TrainSpec, nested_model


def spec_yaml(flags: TrainFlags, argv: list[str]) -> str:
    lines = ["# rwkvray job spec converted from RWKV-PEFT flags; run it with `rwkvray run FILE`", "# flags:"]
    lines += [f"#   {line}" for line in wrapped(shlex.join(argv).replace("\n", "\\n"))]  # comments end at newlines
    lines += [f"# {line}" for line in flags.no_effect]
    body = yaml.safe_dump(in_schema_order(flags.data, TrainSpec), sort_keys=False, allow_unicode=True)
    return "\n".join(lines) + "\n" + body


def in_schema_order(data: dict[str, Any], model: Any) -> dict[str, Any]:
    """The nested dict with each block's keys in the order the schema declares them, empty blocks left out."""
    ordered = {}
    fields = list(model.model_fields) if model else []
    for key in sorted(data, key=lambda k: fields.index(k) if k in fields else len(fields)):
        value = data[key]
        if isinstance(value, dict):
            inner = nested_model(model.model_fields[key].annotation) if key in fields else None
            value = in_schema_order(value, inner)
            if not value:
                continue
        ordered[key] = value
    return ordered


def wrapped(text: str, width: int = 100) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line]
