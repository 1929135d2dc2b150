"""`rwkvray train` and `rwkvray convert-flags`: an RWKV-PEFT train.py command line as a job spec.

`python train.py --load_model M --data_file D --peft state ...` becomes `rwkvray train --load_model M ...`, or,
with `rwkvray convert-flags`, the YAML spec that `rwkvray run` takes. The flags go through the table in
flag_table.py: each one given sets its spec key(s) through its conversion; the schema then judges the values,
and its messages name the flag that set each key (`--micro_bsz: must be ≥ 1`). A flag that changes nothing
here is named in one warning line with the reason, or refused when its value asks for what rwkvray does not do.
The seed form `--action train --data FILE --model FILE` works too.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

from rwkvray.compat.conversions import SKIP, SOURCE, Entries
from rwkvray.compat.flag_table import GROUPS, ROWS, Flag
from rwkvray.compat.spec_api import TrainSpec, default_of, spec_from_dict
from rwkvray.errors import UserError

__all__ = ["SOURCE", "TrainFlags", "build_train_parser", "read_train_flags", "spec_from_train_flags"]
ALWAYS_NAMED = {"model.path": "--load_model", "data.file": "--data_file"}  # named even when missing


class FlagParser(argparse.ArgumentParser):
    """Argparse that reports a bad flag as a one-line UserError instead of usage text and exit 2."""

    def error(self, message: str):
        raise UserError(f"{SOURCE}: {message}{self.spelling_hint(message)}")

    def spelling_hint(self, message: str) -> str:
        """For `--ctx-len`: RWKV-PEFT's flags are spelled with underscores."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        fixes = []
        for given in message.split(":", 1)[1].split():
            flag = given.split("=")[0]
            underscored = "--" + flag[2:].replace("-", "_")
            if flag.startswith("--") and underscored != flag and underscored in self._option_string_actions:
                fixes.append(f"{flag} is {underscored}")
        return f" ({'; '.join(fixes)}: RWKV-PEFT's flags are spelled with underscores)" if fixes else ""


DESCRIPTIONS = {
    "rwkvray train": "Train with RWKV-PEFT's train.py flags (same names, same meanings), on Ray.",
    "rwkvray convert-flags": "Print the job spec (YAML, for `rwkvray run`) that RWKV-PEFT's train.py flags describe.",
}


def build_train_parser(prog: str = "rwkvray train") -> argparse.ArgumentParser:
    parser = FlagParser(
        prog=prog,
        usage=f"{prog} --load_model PTH --data_file PATH [--proj_dir DIR] [FLAG VALUE ...]",
        description=DESCRIPTIONS[prog],
        allow_abbrev=False,
    )
    for title, rows in GROUPS.items():
        group = parser.add_argument_group(title)
        for row in rows:
            names = [f"--{row.name}", *(f"--{alias}" for alias in row.aliases)]
            group.add_argument(*names, dest=row.name, help=row.help, **row.options)
    return parser


@dataclass
class TrainFlags:
    """A command line read through the table: the spec as a nested dict, who set each key, what changed nothing."""

    data: dict[str, Any] = field(default_factory=lambda: {"model": {}, "data": {}})
    names: dict[str, str] = field(default_factory=lambda: dict(ALWAYS_NAMED))  # dotted key -> flag
    no_effect: list[str] = field(default_factory=list)  # one line per flag given that changes nothing

    def spec(self) -> TrainSpec:
        """The validated spec; a bad value is one line naming the flag that set it."""
        return spec_from_dict(self.data, SOURCE, self.names)

    def warn(self) -> None:
        for line in self.no_effect:
            print(f"warning: {line}", file=sys.stderr)

    def apply(self, row: Flag, value: Any, flags: argparse.Namespace) -> None:
        converted = row.convert(value, flags, row.name) if row.convert else value
        if row.key is None:
            self.no_effect.append(f"--{row.name}: no effect here: {row.ignored}")
            return
        keys, values = (row.key, converted) if isinstance(row.key, tuple) else ((row.key,), (converted,))
        for key, one in zip(keys, values):
            if isinstance(one, Entries):
                for below, item, name in one:
                    self.put(f"{key}.{below}", item, name)
            else:
                self.put(key, one, f"--{row.name}")

    def put(self, path: str, value: Any, flag: str) -> None:
        if value is SKIP:
            return
        *blocks, key = path.split(".")
        node = self.data
        for block in blocks:
            node = node.setdefault(block, {})
        key, _, index = key.partition("[")
        if index:  # one item of a list ("betas[1]"): the others keep what they hold, else the spec's defaults
            node.setdefault(key, default_of(path.partition("[")[0]))[int(index.rstrip("]"))] = value
        else:
            node[key] = value
        self.names[path] = flag


def read_train_flags(argv: list[str], prog: str = "rwkvray train") -> TrainFlags:
    """The flags through the table, each given flag once (argparse keeps the last of a repeated flag)."""
    flags = build_train_parser(prog).parse_args(argv)
    read = TrainFlags()
    for row in ROWS:
        value = getattr(flags, row.name)
        if row.always or not (value is None or value is False):
            read.apply(row, value, flags)
    return read


def spec_from_train_flags(argv: list[str]) -> TrainSpec:
    """The spec for an RWKV-PEFT style command line; bad flags raise a one-line UserError."""
    return read_train_flags(argv).spec()
