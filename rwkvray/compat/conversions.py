"""Conversions of the flag table: an RWKV-PEFT flag value as the spec value it means.

Each conversion is called as `convert(value, flags, name)`: the flag's value, every flag (argparse's namespace,
for the few whose meaning depends on another flag) and the flag's name without dashes. It returns the spec
value (a tuple when the row sets several keys; Entries for keys below the row's key), SKIP to set nothing, or
raises a one-line UserError naming the flag. Values the schema checks (ranges, choices) pass through for the
schema to judge.
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from rwkvray.compat.spec_api import strategy_to_deepspeed
from rwkvray.errors import UserError
from rwkvray.files.storage import is_uri

SOURCE = "train flags"
SKIP = object()  # a conversion's answer for "this value sets nothing in the spec"


class Entries(list):
    """A conversion's answer that sets several keys below its row's key: [(key, value, name for messages)]."""


def flag_error(name: str, message: str) -> UserError:
    """`train flags: --name: message`; name may carry more words, e.g. "lora_config lora_r"."""
    return UserError(f"{SOURCE}: --{name}: {message}")


# ---------------------------------------------------------------- the same value, spelled RWKV-PEFT's way


def zero_or_one(value: int, flags: Namespace, name: str) -> bool:
    if value not in (0, 1):
        raise flag_error(name, f"must be 0 or 1 (got {value})")
    return bool(value)


def lowercase(value: str, flags: Namespace, name: str) -> str:
    return value.strip().lower()


def zero_means_auto(value: int, flags: Namespace, name: str) -> Any:
    return value or SKIP


def negative_means_default(value: int, flags: Namespace, name: str) -> Any:
    return SKIP if value < 0 else value


def negative_means_zero(value: int, flags: Namespace, name: str) -> int:
    return max(value, 0)


def loss_mask(value: str, flags: Namespace, name: str) -> str:
    return "none" if value == "pad" else value  # padding never counts here


def mask_id(value: dict, flags: Namespace, name: str) -> Any:
    """data.mask_id's mask0/mask1; RWKV-PEFT's scripts pass --mask_id with every loss mask, and only se reads it."""
    if flags.loss_mask != "se":
        return SKIP
    for key in value:
        if key not in ("mask0", "mask1"):
            raise flag_error(f"{name} {key}", "unknown key (use mask0 and mask1)")
    return Entries((key, text, f"--{name} {key}") for key, text in value.items())


def lr_schedule(value: str, flags: Namespace, name: str) -> str:
    return "cos_decay" if value == "cos" else value


def wandb_project(value: str, flags: Namespace, name: str) -> tuple:
    """(project, mode): RWKV-PEFT logs online whenever a project is named; '' means no W&B, our default."""
    return (value, "online") if value else (SKIP, SKIP)


def kernel(value: str, flags: Namespace, name: str) -> str:
    return "fla" if value == "triton" else value


def fla_switch(value: bool, flags: Namespace, name: str) -> Any:
    return SKIP if flags.op is not None else "fla"


def proj_dir(value: str, flags: Namespace, name: str) -> tuple:
    """(trainer.proj_dir, run.storage_path): without --storage_path the run's checkpoints go there too."""
    return value, SKIP if flags.storage_path is not None else value


# ---------------------------------------------------------------- values found from other flags or the machine


def data_type(value: str | None, flags: Namespace, name: str) -> Any:
    """--data_type, or when it is absent, the type the --data_file path shows: jsonl, numpy or binidx, else utf-8
    (RWKV-PEFT's default)."""
    if value is not None:
        return value
    path = flags.data_file
    if path is None:
        return SKIP
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".npy"):
        return "numpy"
    prefix = os.path.splitext(path)[0] if path.endswith((".bin", ".idx")) else path
    if _is_file(prefix + ".bin") and _is_file(prefix + ".idx"):
        return "binidx"
    return "utf-8"


def _is_file(path: str) -> bool:
    """A local file, or an object in a bucket (s3://, gs://)."""
    if not is_uri(path):
        return os.path.isfile(path)
    from rwkvray.files.cache import object_size
    try:
        object_size(path)
    except OSError:
        return False
    return True


def dim_att(value: int, flags: Namespace, name: str) -> Any:
    """0 (RWKV-PEFT: the same as --n_embd) or --n_embd itself; RWKV-7 has no other attention width."""
    if value and flags.n_embd is not None and value != flags.n_embd:
        raise flag_error(name, f"must be 0 or --n_embd ({flags.n_embd})")
    return value or SKIP


def worker_count(value: int, flags: Namespace, name: str) -> int:
    """Ray workers = --devices × --num_nodes (rows for both flags give the same product)."""
    for flag in ("devices", "num_nodes"):
        given = getattr(flags, flag)
        if given is not None and given < 1:
            raise flag_error(flag, f"must be ≥ 1 (got {given})")
    return (flags.devices or 1) * (flags.num_nodes or 1)


def strategy(value: str, flags: Namespace, name: str) -> tuple[int, bool]:
    """(deepspeed.stage, deepspeed.offload) of a Lightning strategy name."""
    try:
        return strategy_to_deepspeed(value)
    except UserError as e:
        raise flag_error(name, str(e)) from None


def accelerator(value: str | None, flags: Namespace, name: str) -> bool:
    """scaling.use_gpu; without the flag, what this machine has."""
    chosen = (value or machine_accelerator()).lower()
    if chosen not in ("gpu", "cuda", "cpu"):
        raise flag_error(name, f"{value!r} is not supported (use gpu or cpu)")
    if chosen == "cpu":
        refuse_gpu_only_flags(flags)
    return chosen != "cpu"


def machine_accelerator() -> str:
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def refuse_gpu_only_flags(flags: Namespace) -> None:
    """GPU-only choices on a CPU run, refused in the flags' own words (the schema would name spec keys)."""
    cpu = "--accelerator cpu" if flags.accelerator else "--accelerator cpu (the default here: no CUDA device)"
    op_flag = "fla" if flags.fla and flags.op is None else "op"
    op = "fla" if op_flag == "fla" else flags.op
    if op in ("cuda", "fla", "triton"):
        raise flag_error(op_flag, f"{op} needs a GPU, but the run is on {cpu}: use --op torch, or --accelerator gpu")
    if flags.precision == "fp16":
        raise flag_error("precision", f"fp16 needs a GPU, but the run is on {cpu}: use --precision bf16 or fp32")
    if flags.strategy and flags.strategy.endswith("_offload"):
        raise flag_error("strategy", f"{flags.strategy} moves the optimizer to CPU memory, where it already is on "
                         f"{cpu}: use {flags.strategy.removesuffix('_offload')}")


# ---------------------------------------------------------------- flags without a spec key


def must_be(accepted: tuple, why: str):
    """For a flag that sets nothing: a value other than `accepted` asks for what rwkvray does not do."""

    def check(value: Any, flags: Namespace, name: str) -> Any:
        if value not in accepted:
            raise flag_error(name, f"{value!r} is not supported: {why}")
        return SKIP

    return check


STREAM_TYPES = ("utf-8", "utf-16le", "numpy", "uint16", "dummy")


def dataload(value: str, flags: Namespace, name: str) -> Any:
    """pad or only; RWKV-PEFT reads token streams (which have no documents) in random windows whatever it says."""
    if value not in ("pad", "only"):
        raise flag_error(name, f"{value!r} is not supported (use pad or only; leave it out for every piece of every "
                         "document)")
    return SKIP if data_type(flags.data_type, flags, "data_type") in STREAM_TYPES else value


def my_exit(value: int, flags: Namespace, name: str) -> Any:
    if value + 1 < (flags.epoch_count or 1):
        raise flag_error(name, f"would stop after epoch {value}: set --epoch_count instead")
    return SKIP


def weight_decay_final(value: float, flags: Namespace, name: str) -> Any:
    if value > 0:
        raise flag_error(name, "decaying weight decay is not supported: it stays at --weight_decay")
    return SKIP
