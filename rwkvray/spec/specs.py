"""A spec per command: TrainSpec (`rwkvray run` and `train`), TuneSpec (`tune`), ServeSpec (`serve`) and
EvalSpec (`eval`).

Each holds only the blocks its command reads, all required or defaulted. A validated spec is frozen: a changed
one (a Tune trial's) is made with model_copy(update=...).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from pydantic import Field, PrivateAttr, model_validator

from rwkvray.errors import UserError
from rwkvray.files.storage import is_uri
from rwkvray.spec.blocks import (DataConfig, LoggingConfig, ModelConfig, OptimConfig, PeftConfig, RunConfig,
                                 ScalingConfig, TrainerConfig)
from rwkvray.spec.deepspeed_block import DeepSpeedBlock
from rwkvray.spec.eval_block import EvalConfig
from rwkvray.spec.fields import GPU_OPS, StrictModel
from rwkvray.spec.serve_block import ServeConfig
from rwkvray.spec.tune_block import TuneConfig, sampled_range
from rwkvray.spec.wording import SpecProblem


class Spec(StrictModel):
    """What every spec knows besides its blocks, for error messages: where it came from, and what the user calls
    its keys (command-line flags, when the spec was made from flags)."""

    kind: ClassVar[str]
    command: ClassVar[str]  # the command that takes this kind of spec
    _source: str = PrivateAttr(default="<spec>")
    _key_names: dict[str, str] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any) -> None:
        context = context or {}
        self._source = context.get("source", self._source)
        self._key_names = context.get("key_names") or {}

    @property
    def source(self) -> str:
        """A file path, or 'train flags'."""
        return self._source

    def key_name(self, path: str) -> str:
        """The dotted key `path` as the user wrote it: the key itself, or the flag that set it."""
        return self._key_names.get(path, path)


class TrainSpec(Spec):
    kind: ClassVar[str] = "train"
    command: ClassVar[str] = "rwkvray run"

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig
    data: DataConfig
    peft: PeftConfig = Field(default_factory=PeftConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedBlock = Field(default_factory=DeepSpeedBlock)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="before")
    @classmethod
    def default_proj_dir(cls, data: Any) -> Any:
        """trainer.proj_dir, the driver's local copy of the outputs, defaults to <storage_path>/<name> (or
        ./runs/<name> when storage_path is a URI). Filled in before validation, which resolves it."""
        run = data.get("run", {}) if isinstance(data, dict) else None
        trainer = data.get("trainer", {}) if isinstance(data, dict) else None
        if not isinstance(run, dict) or not isinstance(trainer, dict) or trainer.get("proj_dir") is not None:
            return data  # a malformed block is reported by its own validation
        storage = run.get("storage_path", RunConfig.model_fields["storage_path"].default)
        name = run.get("name", RunConfig.model_fields["name"].default)
        if not isinstance(storage, str) or not isinstance(name, str):
            return data
        local_root = "./runs" if is_uri(storage) else storage
        return {**data, "trainer": {**trainer, "proj_dir": os.path.join(local_root, name)}}

    @model_validator(mode="after")
    def fits_the_hardware(self) -> TrainSpec:
        if self.scaling.use_gpu:
            return self
        if self.trainer.op in GPU_OPS:
            raise SpecProblem("trainer.op", f"{self.trainer.op} needs a GPU (set scaling.use_gpu: true, or op: torch)")
        if self.trainer.precision == "fp16":
            raise SpecProblem("trainer.precision", "fp16 needs a GPU (set scaling.use_gpu: true, or use bf16/fp32)")
        if self.deepspeed.offload:
            raise SpecProblem(
                "deepspeed.offload", "needs scaling.use_gpu: true (on CPU the optimizer already lives in host memory)"
            )
        return self

    @model_validator(mode="after")
    def publishable(self) -> TrainSpec:
        if self.run.publish and (self.peft.method != "state" or self.peft.combine_state):
            raise SpecProblem("run.publish", "publishes a state for Serve, which serves states alone: needs "
                              "peft.method: state (without combine_state)")
        return self

    @model_validator(mode="after")
    def whole_document_samples(self) -> TrainSpec:
        if self.data.dataload == "only" and self.trainer.micro_bsz != 1:
            raise SpecProblem("data.dataload", "only gives each sample its document's own length: needs a "
                              f"micro-batch of 1 (got {self.trainer.micro_bsz}); pad pads them into a batch")
        return self

    @model_validator(mode="after")
    def chunks_fit_the_sample(self) -> TrainSpec:
        if "chunk_grad" in self.trainer.model_fields_set and self.trainer.chunk_ctx is None:
            raise SpecProblem("trainer.chunk_grad", "is read only with chunk_ctx set (--train_type infctx)")
        if self.trainer.chunk_ctx is not None and self.trainer.chunk_ctx > self.data.ctx_len:
            raise SpecProblem("trainer.chunk_ctx", f"must be ≤ ctx_len ({self.data.ctx_len}): each ctx_len sample "
                              f"runs in chunks of chunk_ctx tokens (got {self.trainer.chunk_ctx})")
        return self

    @model_validator(mode="after")
    def capturable_step(self) -> TrainSpec:
        """A captured step has one shape, one micro-batch per optimizer step and no DeepSpeed around it."""
        if not self.trainer.cuda_graph:
            return self
        if not self.scaling.use_gpu:
            raise SpecProblem("trainer.cuda_graph", "needs a GPU (set scaling.use_gpu: true, or cuda_graph: false)")
        if self.trainer.grad_accum > 1:
            raise SpecProblem("trainer.cuda_graph", "captures one optimizer step per micro-batch: needs "
                              f"trainer.grad_accum: 1 (got {self.trainer.grad_accum}); raise micro_bsz instead")
        if self.scaling.num_workers > 1:
            raise SpecProblem("trainer.cuda_graph", "needs scaling.num_workers: 1 (DeepSpeed's step across "
                              f"{self.scaling.num_workers} workers cannot be captured)")
        if self.deepspeed.offload or self.deepspeed.stage > 1:
            raise SpecProblem("trainer.cuda_graph", "runs its own captured AdamW step, which one worker's ZeRO "
                              "stage 0/1 equals; it cannot honour deepspeed stage 2/3 or offload (got stage "
                              f"{self.deepspeed.stage}{', offload' if self.deepspeed.offload else ''})")
        return self


class TuneSpec(TrainSpec):
    """A TrainSpec whose tune block sweeps some of its values; each trial trains a copy with sampled ones."""

    kind: ClassVar[str] = "tune"
    command: ClassVar[str] = "rwkvray tune"

    tune: TuneConfig
    eval: EvalConfig | None = None  # data scored on each report, for a tune.metric eval/<file>/<metric>

    @model_validator(mode="after")
    def eval_metric_has_its_data(self) -> TuneSpec:
        if not self.tune.metric.startswith("eval/"):
            if self.eval is not None:
                raise SpecProblem("eval", f"is scored only for a tune.metric eval/<file>/<metric> (tune.metric is "
                                  f"{self.tune.metric}); use rwkvray eval to score states")
            return self
        file_name = self.tune.metric.split("/")[1]
        if self.eval is None:
            raise SpecProblem("tune.metric", f"{self.tune.metric} needs an eval block whose data has {file_name}")
        names = [os.path.basename(path) for path in self.eval.data]
        if file_name not in names:
            raise SpecProblem("tune.metric", f"{file_name} is not one of eval.data's files ({', '.join(names)})")
        for key in ("out", "details"):
            if getattr(self.eval, key) is not None:
                raise SpecProblem(f"eval.{key}", "is written by rwkvray eval; a sweep reports eval metrics to Tune")
        if self.peft.method != "state" or self.scaling.num_workers != 1:
            raise SpecProblem("tune.metric", "an eval metric scores each trial's state: it needs peft.method: state "
                              "and scaling.num_workers: 1")
        return self

    @model_validator(mode="after")
    def every_trial_valid(self) -> TuneSpec:
        if self.run.publish:
            raise SpecProblem("run.publish", "publishes the final state of `rwkvray run`; a sweep keeps its best "
                              "trial's state as best_state.pth: publish that with `rwkvray publish`")
        if self.tune.gpus_per_trial > 0 and not self.scaling.use_gpu:
            raise SpecProblem("tune.gpus_per_trial", "needs scaling.use_gpu: true")
        if self.tune.metric == "val_loss" and not (self.data.eval_file or self.data.holdout_fraction > 0):
            raise SpecProblem(
                "tune.metric", "val_loss needs evaluation data: set data.eval_file or data.holdout_fraction"
            )
        lowest_init = sampled_range(self.tune.space.get("lr_init"), self.optim.lr_init)[0]
        highest_final = sampled_range(self.tune.space.get("lr_final"), self.optim.lr_final)[1]
        if highest_final > lowest_init:
            raise SpecProblem(
                "tune.space",
                f"lr_final can reach {highest_final:g} but lr_init can be as low as {lowest_init:g}; "
                "every trial needs lr_final ≤ lr_init",
            )
        return self


class ServeSpec(Spec):
    kind: ClassVar[str] = "serve"
    command: ClassVar[str] = "rwkvray serve"

    serve: ServeConfig


class EvalSpec(Spec):
    """The base model and what to score it on, with which states (`rwkvray eval SPEC`)."""

    kind: ClassVar[str] = "eval"
    command: ClassVar[str] = "rwkvray eval"

    model: ModelConfig
    eval: EvalConfig


def expect_kind(spec: Spec, wanted: type[Spec]) -> Spec:
    """The spec, when it is the kind `wanted.command` needs (a TuneSpec trains too); else one line saying so."""
    if isinstance(spec, wanted):
        return spec
    missing = next(name for name, field in wanted.model_fields.items()
                   if field.is_required() and name not in type(spec).model_fields)
    article = "an" if spec.kind[0] in "aeiou" else "a"
    raise UserError(f"{spec.source}: {missing}: required for {wanted.command} "
                    f"(this is {article} {spec.kind} spec, for {spec.command})")
