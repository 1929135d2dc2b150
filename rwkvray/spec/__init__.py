"""The job spec: one YAML file per command, validated with pydantic v2 (see specs.py for the three kinds).

Every block rejects unknown keys. Errors are one line that names the spec and the dotted key path, for
example `job.yaml: optim.lr_init: must be > 0`. Relative paths are resolved against the working directory when
the spec is loaded (paths.py); `run.storage_path` may also be a URI (`s3://...`, `gs://...`).
"""

from rwkvray.spec.blocks import (DataConfig, LoggingConfig, ModelConfig, OptimConfig, PeftConfig, RunConfig,
                                 ScalingConfig, TrainerConfig, check_model_expectations)
from rwkvray.spec.deepspeed_block import DeepSpeedBlock, strategy_to_deepspeed
from rwkvray.spec.fields import TARGETS
from rwkvray.spec.load import SpecLoader, load_spec, spec_from_dict
from rwkvray.spec.serve_block import ServeConfig
from rwkvray.spec.eval_block import EvalConfig
from rwkvray.spec.specs import EvalSpec, ServeSpec, Spec, TrainSpec, TuneSpec, expect_kind
from rwkvray.spec.tune_block import TUNABLE_KEYS, TuneConfig
from rwkvray.spec.wording import nested_model

__all__ = [
    "TARGETS", "TUNABLE_KEYS", "DataConfig", "DeepSpeedBlock", "EvalConfig", "EvalSpec", "LoggingConfig",
    "ModelConfig", "OptimConfig",
    "PeftConfig", "RunConfig", "ScalingConfig", "ServeConfig", "ServeSpec", "Spec", "SpecLoader", "TrainSpec",
    "TrainerConfig", "TuneConfig", "TuneSpec", "check_model_expectations", "expect_kind", "load_spec",
    "nested_model", "spec_from_dict", "strategy_to_deepspeed",
]
