"""The DeepSpeed config a spec asks for: built from the trainer, optim and deepspeed blocks, with the
deepspeed block's raw `config` merged over it (the spec refuses raw keys that other blocks own)."""

from typing import Any

from rwkvray.spec import TrainSpec


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(spec: TrainSpec) -> dict[str, Any]:
    """The DeepSpeed config for the spec; the trainer builds the optimizer itself (no "optimizer" section)."""
    zero: dict[str, Any] = {"stage": spec.deepspeed.stage}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.trainer.micro_bsz,
        "gradient_accumulation_steps": spec.trainer.grad_accum,
        "gradient_clipping": spec.optim.grad_clip,
        "zero_optimization": zero,
    }
    if spec.deepspeed.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        config["zero_force_ds_cpu_optimizer"] = False  # let the trainer's own optimizer run offloaded
    if spec.trainer.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif spec.trainer.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling
    return deep_merge(config, spec.deepspeed.config or {})
