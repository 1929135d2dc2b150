"""What each command checks before Ray starts, and what `rwkvray validate` checks without starting anything.

The spec loader already checks keys, values and that files exist. Here: that the blocks a command needs are
there, that the model file is an RWKV-7 checkpoint whose shape matches the spec's model.n_layer/n_embd/...
expectations, and (serve) that the API-key variable is set. A cluster's Ray starts only after all of these pass.
"""
import os

import yaml

from rwkvray.config import (ServeConfig, check_model_expectations, load_spec, require_serve_block,
                            require_training_blocks, require_tune_block, spec_from_dict)
from rwkvray.dims import ModelDims
from rwkvray.errors import RayServeConfigFile, UserError

SERVE_APP_PREFIX = "rwkvray.serve.app:"


def checked_model_dims(spec) -> ModelDims:
    """The checkpoint's shape, after comparing it with the spec's model expectations."""
    from rwkvray.checkpoint import load_checkpoint
    dims = load_checkpoint(spec.model.path).dims  # memory-mapped: cheap for a model of any size
    check_model_expectations(spec.model, dims, spec.source)
    return dims


def before_training(spec, tune: bool = False) -> None:
    """`run`, `tune` and multi-worker `train`: everything checkable on this machine."""
    require_training_blocks(spec)
    if tune:
        require_tune_block(spec)
    checked_model_dims(spec)


def before_serving(spec) -> ServeConfig:
    from rwkvray.checkpoint import load_checkpoint
    from rwkvray.serve.app import read_api_key
    config = require_serve_block(spec)
    read_api_key(config)
    load_checkpoint(config.model)
    return config


def validate_file(path: str, check_files: bool = True) -> str:
    """The one line `rwkvray validate` prints for a job spec or a Ray Serve config file that passes."""
    try:
        spec = load_spec(path, check_files=check_files)
    except RayServeConfigFile:
        return validate_ray_serve_config(path, check_files)
    blocks = ", ".join(name for name in type(spec).model_fields if getattr(spec, name) is not None)
    if not check_files:
        return f"{path}: ok ({blocks}); files not checked"
    found = []
    if spec.model is not None:
        dims = checked_model_dims(spec)
        found.append(f"model n_layer {dims.n_layer}, n_embd {dims.n_embd}")
    if spec.serve is not None:
        from rwkvray.checkpoint import load_checkpoint
        load_checkpoint(spec.serve.model)
    return f"{path}: ok ({blocks})" + "".join(f"; {text}" for text in found)


def validate_ray_serve_config(path: str, check_files: bool) -> str:
    """Check the args of each rwkvray application in a Ray Serve config file."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    applications = data.get("applications") or []
    if not isinstance(applications, list):
        raise UserError(f"{path}: applications: must be a list")
    ours = 0
    for index, app in enumerate(applications):
        if not isinstance(app, dict) or not str(app.get("import_path", "")).startswith(SERVE_APP_PREFIX):
            continue
        ours += 1
        where = f"{path}: applications[{index}].args"
        args = app.get("args") or {}
        if not isinstance(args, dict):
            raise UserError(f"{where}: must be a mapping of serve fields, or spec: PATH")
        if set(args) == {"spec"}:
            require_serve_block(load_spec(args["spec"], check_files=check_files))
            continue
        names = {f"serve.{name}": name for name in (*ServeConfig.model_fields, *args)}  # args are serve fields
        spec_from_dict({"serve": args}, where, names, check_files=check_files)
    files = "" if check_files else "; files not checked"
    return (f"{path}: ok, a Ray Serve config file with {ours} rwkvray application(s){files}; "
            f"start it with `serve run {path}`")
