"""Conversions of the PEFT flags: which method (from --peft, --train_type and the old switches) and its settings
(from the method's JSON config and the old --lora_* flags). Called like every conversion: (value, flags, name).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from rwkvray.compat.conversions import SKIP, Entries, flag_error
from rwkvray.compat.spec_api import TARGETS, default_of

WEIGHT_METHODS = {"lora": "lora", "pissa": "pissa", "disha": "disha", "miss": "disha", "bone": "disha"}
CONFIG_FLAGS = {  # method -> flags that may carry its JSON config
    "lora": ("lora_config", "peft_config"),
    "pissa": ("pissa_config", "peft_config"),
    "disha": ("disha_config", "miss_config", "bone_config", "peft_config"),
}
ALL_CONFIG_FLAGS = ("lora_config", "pissa_config", "disha_config", "miss_config", "bone_config", "peft_config")
CONFIG_KEYS = {  # method -> {RWKV-PEFT JSON key: our key}
    "lora": {"r": "r", "lora_r": "r", "alpha": "alpha", "lora_alpha": "alpha", "dropout": "dropout",
             "lora_dropout": "dropout", "target_modules": "targets", "lora_parts": "targets"},
    "pissa": {"r": "r", "pissa_r": "r", "lora_r": "r", "svd_niter": "svd_niter", "target_modules": "targets"},
    "disha": {"r": "r", "bone_r": "r", "mode": "mode", "bone_mode": "mode", "target_modules": "targets"},
}
RWKV_PEFT_CHUNK_CTX = 512  # --chunk_ctx's default in RWKV-PEFT's train.py
LOAD_KEYS = ("load", "lora_load", "pissa_load", "pissa_init", "bone_load")  # adapter weights to start from
OLD_ADAPTER_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_parts", "lora_load", "svd_niter")
UNSUPPORTED_PEFT = {  # --peft value today's RWKV-PEFT hands to Hugging Face peft -> what to use instead
    "adalora": "use --peft lora (AdaLoRA is LoRA whose ranks are pruned during training)",
    "prefix": "use --peft state (state tuning is RWKV's prefix tuning: a learned initial state)",
}
TRAIN_PARTS_REFUSED = {  # --train_parts value -> why not
    "time": "RWKV-7 has no time_* parameters, so RWKV-PEFT trains nothing for it either (use ln, or drop it)",
    "emb": "training the embedding is full fine-tuning of it (use ln)",
    "head": "training the head is full fine-tuning of it (use ln)",
}


def peft_method(value: Any, flags: Namespace, name: str) -> tuple[Any, Any, Any]:
    """(peft.method, peft.combine_state, peft.state.shift) from --peft, --train_type and the old --lora/--PISSA/
    --state_tune; set by the --peft row when --peft is given, so that the schema's messages about them name --peft.
    --train_type fullstate is state tuning plus the token-shift starts, with or without --peft state (where
    RWKV-PEFT would quietly fall back to plain state tuning)."""
    if name != "peft" and flags.peft is not None:
        return SKIP, SKIP, SKIP
    return chosen_method(flags)


def chosen_method(flags: Namespace) -> tuple[str, Any, Any]:
    peft = (flags.peft or "none").lower()
    if peft in UNSUPPORTED_PEFT:
        raise flag_error("peft", f"{flags.peft!r} is not supported: {UNSUPPORTED_PEFT[peft]}")
    train_type = (flags.train_type or "none").lower()
    if train_type not in ("none", "state", "states", "fullstate", "infctx"):
        raise flag_error("train_type", f"{flags.train_type!r} is not supported (use state, fullstate or infctx, or "
                                       "leave it out)")
    shift = True if train_type == "fullstate" else SKIP
    if peft not in ("none", "state", *WEIGHT_METHODS):
        return peft, SKIP, shift  # the schema names the methods there are
    weight = WEIGHT_METHODS.get(peft) or ("lora" if flags.lora else "pissa" if flags.PISSA else None)
    # infctx (long documents in chunks) tunes the state unless --peft names a weight method
    state = (peft == "state" or train_type in ("state", "states", "fullstate") or flags.state_tune
             or (train_type == "infctx" and not weight))
    if weight is None and not state and flags.peft is not None:
        raise flag_error("peft", "full fine-tuning is not supported: use --peft state, lora, pissa or disha")
    return (weight, True if state else SKIP, shift) if weight else ("state", SKIP, shift)


def adapter_settings(value: Any, flags: Namespace, name: str) -> Entries:
    """The method's block (peft.lora, peft.pissa or peft.disha) from its JSON config and the old flags."""
    method = chosen_method(flags)[0]
    if method not in CONFIG_KEYS or (name in ALL_CONFIG_FLAGS and name not in CONFIG_FLAGS[method]):
        raise flag_error(name, f"given, but the method is {method}")
    entries = Entries()
    for where, key, setting in given_settings(flags, method):
        if key in LOAD_KEYS:
            if setting:
                why = "starting from saved adapter weights is not supported (rerun with the same --name to resume)"
                raise flag_error(where, why)
            continue
        if key not in CONFIG_KEYS[method]:
            raise flag_error(where, f"unknown key for {method} (use {', '.join(CONFIG_KEYS[method])})")
        ours = CONFIG_KEYS[method][key]
        entries.append((f"{method}.{ours}", targets(setting, where) if ours == "targets" else setting, f"--{where}"))
    return entries


def given_settings(flags: Namespace, method: str) -> list[tuple[str, str, Any]]:
    """(where, RWKV-PEFT key, value) of every adapter setting on the command line, each given once."""
    given = [f for f in CONFIG_FLAGS[method] if getattr(flags, f) is not None]
    if len(given) > 1:
        raise flag_error(given[1], f"give the {method} settings once (--{given[0]} is given too)")
    settings = [(f"{given[0]} {key}", key, value) for key, value in getattr(flags, given[0]).items()] if given else []
    for flag in OLD_ADAPTER_FLAGS:
        if getattr(flags, flag) is not None:
            if any(key == flag for _, key, _ in settings):
                raise flag_error(flag, f"also given in --{given[0]}")
            settings.append((flag, flag, getattr(flags, flag)))
    return settings


def targets(names: Any, where: str) -> list[str]:
    """RWKV-PEFT target names (att, ffn, key, att.key, ...) as our module names, in our order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise flag_error(where, "must be a list of module names")
    chosen = set()
    for name in names:
        matches = [t for t in TARGETS if name in (t, *t.split("."))]
        if not matches:
            raise flag_error(where, f"{name!r} is not a module rwkvray adapts (use {', '.join(TARGETS)}, att or ffn)")
        chosen.update(matches)
    return [t for t in TARGETS if t in chosen]


def train_parts(value: list[str], flags: Namespace, name: str) -> list[str]:
    for part in value:
        if part != "ln":
            raise flag_error(name, f"{part!r} is not supported: {TRAIN_PARTS_REFUSED.get(part, 'only ln is')}")
    return ["ln"] if value else []


def chunk_ctx(value: int | None, flags: Namespace, name: str) -> Any:
    """trainer.chunk_ctx: read only with --train_type infctx, as in RWKV-PEFT; its default 512, or --ctx_len when
    that is shorter (one chunk, as RWKV-PEFT runs it)."""
    if (flags.train_type or "").lower() != "infctx":
        return SKIP
    if value is None:
        return min(RWKV_PEFT_CHUNK_CTX, flags.ctx_len or default_of("data.ctx_len"))
    return value
