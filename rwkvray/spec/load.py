"""Reading a spec: YAML in, a validated TrainSpec, TuneSpec or ServeSpec out, every problem one UserError line.

The file's blocks decide its kind: a tune block makes a TuneSpec, a serve block alone a ServeSpec, anything else
a TrainSpec. A command that needs another kind says so in one line (expect_kind).
"""

from __future__ import annotations

import os
import re

import yaml
from pydantic import ValidationError

from rwkvray.errors import RayServeConfigFile, UserError
from rwkvray.spec.specs import EvalSpec, ServeSpec, Spec, TrainSpec, TuneSpec, expect_kind
from rwkvray.spec.wording import format_validation_error, yaml_type

RAY_SERVE_CONFIG_KEYS = ("applications", "http_options")


class SpecLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-2 as a float (YAML 1.1 wants 1.0e-2) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_spec(path: str, check_files: bool = True, kind: type[Spec] | None = None) -> Spec:
    """Read and validate a YAML spec; every problem becomes a one-line UserError. check_files=False accepts
    paths to files that are not on this machine; `kind` (TrainSpec, TuneSpec, ServeSpec) is the one the caller
    needs."""
    data = read_yaml(path)
    found = [key for key in RAY_SERVE_CONFIG_KEYS if key in data]
    if found:
        raise RayServeConfigFile(f"{path}: this is a Ray Serve config file (it has {' and '.join(found)}), not an "
                                 f"rwkvray job spec: start it with `serve run {path}`, or `serve deploy {path}` "
                                 "on a running cluster")
    spec = spec_from_dict(data, path, check_files=check_files)
    return expect_kind(spec, kind) if kind else spec


def read_yaml(path: str) -> dict:
    """The spec file's top-level mapping."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a spec file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"spec file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=SpecLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else path
        kind = "" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error: "  # e.g. a duplicate key
        raise UserError(f"{where}: {kind}{e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: YAML error: {str(e).splitlines()[0]}") from None
    if data is None:
        raise UserError(f"{path}: the spec is empty (expected blocks such as model, data, trainer)")
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: the top level must be a mapping of blocks (model, data, ...), not a {yaml_type(data)}"
        )
    return data


def spec_kind(blocks: dict, source: str) -> type[Spec]:
    """TuneSpec with a tune block, ServeSpec with a serve block alone, EvalSpec with an eval block and no data
    block, else TrainSpec."""
    if "serve" in blocks:
        others = [key for key in blocks if key != "serve"]
        if others:
            raise UserError(f"{source}: serve: a serve spec holds the serve block alone (this one also has "
                            f"{', '.join(others)}): train or tune from a spec of its own")
        return ServeSpec
    if "eval" in blocks and "data" not in blocks and "tune" not in blocks:
        return EvalSpec
    return TuneSpec if "tune" in blocks else TrainSpec


def spec_from_dict(data: dict, source: str, key_names: dict[str, str] | None = None,
                   check_files: bool = True) -> Spec:
    """Validate a spec given as a dict. key_names renames key paths in messages (e.g. to command-line flags)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the spec must be a mapping (got {yaml_type(data)})")
    blocks = {key: value for key, value in data.items() if value is not None}  # `optim:` alone means defaults
    kind = spec_kind(blocks, source)
    try:
        return kind.model_validate(blocks, context={"source": source, "key_names": key_names,
                                                    "check_files": check_files})
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, kind, key_names)) from None
