"""Learning-rate schedules. Both warm up linearly from lr_final to lr_init and end exactly at lr_final."""
import math

WSD_DECAY_FRACTION = 0.2  # wsd: stable at lr_init, then the last 20% of the steps decay


def learning_rate(step: int, total_steps: int, lr_init: float, lr_final: float, warmup_steps: int, schedule: str) -> float:
    if step < warmup_steps:
        return lr_final + (lr_init - lr_final) * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if schedule == "cos_decay":
        return lr_final + 0.5 * (lr_init - lr_final) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = 1 - WSD_DECAY_FRACTION
        if progress <= decay_start:
            return lr_init
        # exponential interpolation: the rate falls by the same factor each step, as RWKV-LM's decay does
        return lr_init * (lr_final / lr_init) ** ((progress - decay_start) / WSD_DECAY_FRACTION)
    raise ValueError(f"unknown lr schedule {schedule!r}")
