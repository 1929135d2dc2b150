"""Hugging Face `peft` adapter folders (save_pretrained: adapter_config.json + adapter_model.safetensors), both ways.

Today's RWKV-PEFT (`--merge 0`) writes one with `get_peft_model(RWKV7, LoraConfig | MissConfig)`, so its tensors
are named `base_model.model.<BlinkDL module>.lora_A.weight` (LoRA) or `....miss_block` (MiSS, which is DiSHA's
bone). Our single-file adapters map onto it:
- lora: the same A, B and alpha;
- pissa: W - B0 A0 + B A is the LoRA [B, -B0] [A; A0] of rank 2r with alpha 2r, so the folder applies to the
  original base, as any LoRA folder does;
- disha bone: MiSS's default mode, D as `miss_block`. (Bat has no peft form: MiSS's bat indexes D by output block.)

The folder is written by peft's own `save_pretrained`, on a meta-device skeleton of the model (no base weights
are read), into a temporary folder that then replaces the old one.
"""
import json
import os
import shutil

import torch

from rwkvray.errors import UserError

ADAPTER = "default"  # peft's adapter name; save_pretrained drops it from the keys
PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
TARGET_NAMES = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def write_adapter_folder(folder: str, kind: str, adapter: dict[str, torch.Tensor], dims,
                         lora_dropout: float = 0.0) -> None:
    """Write `adapter` (single-file key names) as a save_pretrained folder for a model of `dims`."""
    from peft import get_peft_model

    from rwkvray.model.rwkv import RWKV
    config, tensors = _peft_form(kind, adapter, lora_dropout)
    with torch.device("meta"):
        skeleton = RWKV(dims)
    model = get_peft_model(skeleton, config)
    model.load_state_dict(tensors, strict=False, assign=True)
    folder = os.path.abspath(folder)
    staging, old = f"{folder}.{os.getpid()}.new", f"{folder}.{os.getpid()}.old"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)  # makedirs, not mkdtemp: the folder gets the usual (umask) permissions
    try:
        model.save_pretrained(staging)
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _peft_form(kind: str, adapter: dict, lora_dropout: float):
    """(peft config, tensors under the names of the peft model's state dict) for a single-file adapter."""
    from peft import LoraConfig, MissConfig
    modules = sorted({key.rpartition(".")[0] for key in adapter if key.endswith((".lora_A", ".disha"))})
    targets = [t for t in TARGET_NAMES if any(m.endswith("." + t) for m in modules)]
    if kind == "disha":
        r = adapter[modules[0] + ".disha"].shape[0]
        tensors = {f"{PREFIX}{m}.miss_block.{ADAPTER}": adapter[m + ".disha"] for m in modules}
        return MissConfig(r=r, target_modules=targets), tensors
    tensors = {}
    for m in modules:
        A, B = adapter[m + ".lora_A"], adapter[m + ".lora_B"]
        if kind == "pissa":
            A = torch.cat([A, adapter[m + ".init_lora_A"].to(A.dtype)])
            B = torch.cat([B, -adapter[m + ".init_lora_B"].to(B.dtype)], dim=1)
        tensors[f"{PREFIX}{m}.lora_A.{ADAPTER}.weight"] = A
        tensors[f"{PREFIX}{m}.lora_B.{ADAPTER}.weight"] = B
    r = tensors[f"{PREFIX}{modules[0]}.lora_A.{ADAPTER}.weight"].shape[0]
    alpha = r if kind == "pissa" else adapter["lora_alpha"].item()
    dropout = 0.0 if kind == "pissa" else lora_dropout
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), tensors


def read_adapter_folder(folder: str) -> tuple[str, dict[str, torch.Tensor], float | None]:
    """(kind, tensors under single-file key names, LoRA alpha) of a save_pretrained folder."""
    from safetensors.torch import load_file
    config = _read_config(folder)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise UserError(f"{folder}: no {WEIGHTS_FILE} (a save_pretrained folder has one beside {CONFIG_FILE})")
    tensors = {key.removeprefix(PREFIX): value for key, value in load_file(weights_path).items()}
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        _refuse_lora_variants(config, folder)
        renamed = {key.removesuffix(".weight"): value for key, value in tensors.items()}
        return "lora", renamed, float(config["lora_alpha"])
    if peft_type == "MISS":
        if config.get("init_weights", True) is not True:
            raise UserError(f"{folder}: MiSS mode {config['init_weights']!r} is not DiSHA's (rwkvray merges the "
                            "default mode, which is DiSHA bone)")
        return "disha", {key.replace(".miss_block", ".disha"): value for key, value in tensors.items()}, None
    raise UserError(f"{folder}: peft_type {peft_type!r} is not supported (rwkvray merges LORA and MISS folders)")


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {CONFIG_FILE}: not a save_pretrained adapter folder")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return config


def _refuse_lora_variants(config: dict, folder: str) -> None:
    """Plain LoRA only: these settings change the update W + (alpha/r) B A."""
    for key, why in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA's alpha/sqrt(r) scale"),
                     ("alpha_pattern", "a per-module alpha"), ("lora_bias", "a LoRA bias")):
        if config.get(key):
            raise UserError(f"{folder}: {CONFIG_FILE} sets {key} ({why}), which rwkvray merge does not support")
