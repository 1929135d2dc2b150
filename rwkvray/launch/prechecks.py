"""What each command checks before Ray starts, and what `rwkvray validate` checks without starting anything.

The spec loader already checks keys, values, that files exist and that the spec is the kind the command takes.
Here: that the model file is an RWKV checkpoint (x070 or x060) whose shape matches the spec's model.n_layer/n_embd/...
expectations, that every line of the data files reads as the workers will read it, that output folders can be
written, and (serve) that the API-key variable is set and the port is
free. Ray starts only after all of these pass.
"""
import errno
import os
import socket

import numpy as np

import yaml

from rwkvray.spec import ServeConfig, ServeSpec, check_model_expectations, load_spec, spec_from_dict
from rwkvray.model.dims import RWKVDims
from rwkvray.errors import RayServeConfigFile, UserError
from rwkvray.files.cache import local_copy
from rwkvray.files.storage import is_uri, unreachable
from rwkvray.train.inputs import local_inputs

SERVE_APP_PREFIX = "rwkvray.launch.serving:"


def checked_model_dims(spec) -> RWKVDims:
    """The checkpoint's shape, after comparing it with the spec's model expectations."""
    from rwkvray.model.checkpoint import load_checkpoint
    dims = load_checkpoint(local_copy(spec.model.path)).dims  # memory-mapped; a URI is downloaded once, here
    check_model_expectations(spec.model, dims, spec.source)
    return dims


def before_training(spec, tune: bool = False, address: str | None = None) -> None:
    """`run`, `tune` and `train`: everything checkable on this machine."""
    dims = checked_model_dims(spec)
    check_data_files(spec, dims.vocab_size)
    check_output_folders(spec)
    check_local_gpus(spec, tune, address)


def check_data_files(spec, vocab_size: int) -> None:
    """The data (and eval) files, checked as the workers will read them: every jsonl line (all bad lines, up to a
    cap, in one error, each as `file:line: reason`), a binidx index, a text file's encoding, token ids below the
    model's vocab_size, an sft dataset's split and columns."""
    from rwkvray.train.data import check_binidx, scan_jsonl
    from rwkvray.train.sft_data import sft_rows
    from rwkvray.train.token_files import STREAM_TYPES, check_stream, check_token_ids
    data = local_inputs(spec).data  # URIs: checked in this node's cache, where the workers of this node read them
    for key, path in (("data.file", data.file), ("data.eval_file", data.eval_file)):
        if path is None:
            continue
        where = f"{spec.source}: {spec.key_name(key)}"
        try:
            if data.type == "binidx":
                bin_path, dtype = check_binidx(path)[:2]
                if os.path.getsize(bin_path):
                    check_token_ids(bin_path, np.memmap(bin_path, dtype=dtype, mode="r"), vocab_size)
            elif data.type == "sft":
                sft_rows(path, data.sft_split, data.sft_field)
            elif data.type in STREAM_TYPES:
                check_stream(path, data.type, vocab_size)
        except UserError as e:
            raise UserError(f"{where}: {e}; nothing was started") from None
        if data.type == "jsonl":
            problems = scan_jsonl(path, "none" if data.loss_mask == "se" else data.loss_mask)
            if problems:
                raise UserError(f"{where}: {path} has bad lines; nothing was started:\n" + "\n".join(problems))


def check_local_gpus(spec, tune: bool, address: str | None) -> None:
    """A local Ray instance has only this machine's GPUs, and would wait for more for ever."""
    from rwkvray.launch.ray_session import resolve_address
    if not spec.scaling.use_gpu or resolve_address(address)[0] != "local":
        return
    import torch
    scaling = spec.scaling
    single_trials = tune and scaling.num_workers == 1  # each trial trains in its own process, with its own GPUs
    needed = spec.tune.gpus_per_trial if single_trials else (
        scaling.num_workers * scaling.resources_per_worker.get("GPU", 1))
    available = torch.cuda.device_count()
    if needed > available:
        key, cluster = "scaling.use_gpu", "--address or RAY_ADDRESS"
        if spec.key_name(key) != key:  # `rwkvray train --accelerator gpu`: that command has no --address
            key, cluster = f"{spec.key_name(key)} gpu", "RAY_ADDRESS"
        raise UserError(f"{spec.source}: {key}: the run needs {needed:g} GPU(s) and this machine has {available}, "
                        f"with no {cluster} naming a cluster that has them")


def check_output_folders(spec) -> None:
    """The run's folders can be made and written here (a shared or URI storage_path is checked by Ray)."""
    for key, path in (("run.storage_path", spec.run.storage_path), ("trainer.proj_dir", spec.trainer.proj_dir)):
        if not is_uri(path):
            check_writable_folder(path, f"{spec.source}: {spec.key_name(key)}")


def check_writable_folder(path: str, where: str) -> None:
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{where}: cannot make {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{where}: cannot write in {existing} (permission denied)")


def check_states_dir(states_dir: str, where: str) -> None:
    """A local states_dir can be made and written here; a URI's bucket answers (with the AWS_* settings here)."""
    if not is_uri(states_dir):
        check_writable_folder(states_dir, where)
        return
    problem = unreachable(states_dir)
    if problem:
        raise UserError(f"{where}: cannot use {states_dir}: {problem}")


def check_serve_model(config: ServeConfig) -> None:
    from rwkvray.model.checkpoint import load_checkpoint
    load_checkpoint(local_copy(config.model))  # an RWKV checkpoint, not just a file


def before_serving(spec, address: str | None = None) -> ServeConfig:
    from rwkvray.launch.ray_session import resolve_address
    from rwkvray.launch.serving import read_api_key
    config = spec.serve
    read_api_key(config)
    check_serve_model(config)
    check_states_dir(config.states_dir, f"{spec.source}: serve.states_dir")
    if resolve_address(address)[0] == "local":  # on a cluster the head binds the port and holds the GPUs
        check_port_free(config.host, config.port, spec.source)
        import torch
        if config.use_gpu is True and config.replicas > torch.cuda.device_count():
            raise UserError(f"{spec.source}: serve.use_gpu: {config.replicas} replica(s) need a GPU each and this "
                            f"machine has {torch.cuda.device_count()}, with no --address or RAY_ADDRESS naming a "
                            "cluster that has them (use_gpu: auto serves on the CPU)")
    return config


def check_port_free(host: str, port: int, source: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"{source}: serve.port: {host}:{port} is in use by another program "
                                "(choose another serve.port)") from None
            raise UserError(f"{source}: serve.host: cannot listen on {host}:{port} ({err.strerror})") from None


def validate_file(path: str, check_files: bool = True) -> str:
    """The one line `rwkvray validate` prints for a job spec or a Ray Serve config file that passes."""
    try:
        spec = load_spec(path, check_files=check_files)
    except RayServeConfigFile:
        return validate_ray_serve_config(path, check_files)
    article = "an" if spec.kind[0] in "aeiou" else "a"
    summary = f"{path}: ok, {article} {spec.kind} spec ({', '.join(type(spec).model_fields)})"
    if not check_files:
        return f"{summary}; files not checked"
    if isinstance(spec, ServeSpec):
        check_serve_model(spec.serve)
        return summary
    dims = checked_model_dims(spec)
    return f"{summary}; model n_layer {dims.n_layer}, n_embd {dims.n_embd}"


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
            config = load_spec(args["spec"], check_files=check_files, kind=ServeSpec).serve
        else:
            names = {f"serve.{name}": name for name in (*ServeConfig.model_fields, *args)}  # args are serve fields
            config = spec_from_dict({"serve": args}, where, names, check_files=check_files).serve
        if check_files:
            check_serve_model(config)
    files = "" if check_files else "; files not checked"
    return (f"{path}: ok, a Ray Serve config file with {ours} rwkvray application(s){files}; "
            f"start it with `serve run {path}`")
