"""The tune block's search space as Ray Tune's param_space, and the spec each trial trains."""

from typing import Any

from rwkvray.errors import UserError
from rwkvray.files import storage
from rwkvray.spec import TUNABLE_KEYS, TuneConfig, TuneSpec


def ray_search_space(tune: TuneConfig) -> dict[str, Any]:
    """The Ray Tune param_space for tune.space, keyed like the space (lr_init, ...)."""
    from ray import tune as ray_tune

    builders = {
        "loguniform": lambda a: ray_tune.loguniform(*a),
        "uniform": lambda a: ray_tune.uniform(*a),
        "randint": lambda a: ray_tune.randint(*a),
        "choice": ray_tune.choice,
    }
    return {key: builders[kind](args) for key, dist in tune.space.items() for kind, args in dist.items()}


def spec_for_trial(spec: TuneSpec, trial_config: dict[str, Any], trial_id: str) -> TuneSpec:
    """The sweep's spec with one trial's sampled values (keys of tune.space) in place, whose epoch files and
    metrics land in <sweep storage>/trials/<trial id>. The values come from the validated space, so every
    trial is a valid spec (TuneSpec checks, e.g., that no sampled lr_final exceeds a sampled lr_init)."""
    changes: dict[str, dict[str, Any]] = {}
    for key, value in trial_config.items():
        if key not in TUNABLE_KEYS:
            raise UserError(f"{spec.source}: tune trial config has unknown key {key!r}")
        block, field = TUNABLE_KEYS[key]
        changes.setdefault(block, {})[field] = value
    changes["run"] = {"storage_path": storage.join(spec.run.storage_path, spec.run.name, "trials"), "name": trial_id}
    return spec.model_copy(update={block: getattr(spec, block).model_copy(update=fields)
                                   for block, fields in changes.items()})
