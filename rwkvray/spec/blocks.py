"""The blocks of a training spec: run, model, data, peft, optim, trainer, scaling and logging.

Each block is the input of one part: the run's storage and checkpoints (run), the checkpoint (model), the
data loader (data), the PEFT method (peft), the optimizer and schedule (optim), the training loop (trainer), the
Ray workers (scaling) and wandb (logging). The deepspeed, tune and serve blocks have modules of their own.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from rwkvray.errors import UserError
from rwkvray.files.publish import NAME_RULE, STATE_NAME
from rwkvray.files.storage import is_uri
from rwkvray.spec.fields import (TARGETS, ExistingFile, InputFile, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                                 PositiveInt, StrictModel, Targets)
from rwkvray.spec.paths import data_path, durable_folder
from rwkvray.spec.wording import SpecProblem

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PublishConfig(StrictModel):
    """Where a finished run puts its final state for Serve: `states_dir/NAME.pth` with its card (files/publish.py)."""

    states_dir: Annotated[str, AfterValidator(durable_folder)]  # a Serve spec's serve.states_dir, or a URI
    name: str  # the `model` that requests name
    replace: bool = False  # replace a different state of that name (kept as NAME.prev.pth); default: refuse

    @field_validator("name")
    @classmethod
    def state_name(cls, name: str) -> str:
        if not STATE_NAME.fullmatch(name):
            raise ValueError(f"use {NAME_RULE}")
        return name


class RunConfig(StrictModel):
    name: str = "rwkvray"
    storage_path: Annotated[str, AfterValidator(durable_folder)] = "./runs"
    checkpoint_every_steps: PositiveInt | None = None  # None: checkpoint at each epoch end only
    keep_checkpoints: PositiveInt = 2
    max_failures: int = 0  # -1: retry forever
    publish: PublishConfig | None = None  # none: the final state stays in the run's folder only

    @field_validator("name")
    @classmethod
    def folder_name(cls, name: str) -> str:
        if not RUN_NAME.fullmatch(name):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '.', '_' and '-'")
        return name

    @field_validator("max_failures")
    @classmethod
    def failures(cls, value: int) -> int:
        if value < -1:
            raise ValueError("must be ≥ 0, or -1 to retry forever")
        return value


class ModelConfig(StrictModel):
    """The checkpoint, plus optional expectations checked against its weights (see check_model_expectations)."""

    path: InputFile  # a local file, or an s3:// or gs:// URI (each node caches a copy)
    version: Literal["x070", "x060"] | None = None  # RWKV-7 or RWKV-6; the checkpoint's keys decide, this checks
    n_layer: PositiveInt | None = None
    n_embd: PositiveInt | None = None
    head_size: PositiveInt | None = None
    vocab_size: PositiveInt | None = None


def check_model_expectations(model: ModelConfig, dims, source: str) -> None:
    """Compare the spec's optional version/n_layer/n_embd/head_size/vocab_size with the checkpoint's real ones."""
    mismatches = [
        f"{name}={getattr(dims, name)} but the spec expects {getattr(model, name)}"
        for name in ("version", "n_layer", "n_embd", "head_size", "vocab_size")
        if getattr(model, name) is not None and getattr(model, name) != getattr(dims, name)
    ]
    if mismatches:
        raise UserError(f"{source}: model {model.path} has {'; '.join(mismatches)}")


DATA_TYPES = ("jsonl", "binidx", "sft", "utf-8", "utf-16le", "numpy", "uint16", "dummy")
STREAM_TYPES = ("utf-8", "utf-16le", "numpy", "uint16", "dummy")  # one token stream, no documents


class MaskMarkers(StrictModel):
    """loss_mask se: the loss stops counting at each mask0 text and counts again from each mask1 text."""

    mask0: str = "0"
    mask1: str = "1"

    @field_validator("mask0", "mask1")
    @classmethod
    def not_empty(cls, text: str) -> str:
        if not text:
            raise ValueError("must not be empty")
        return text


class DataConfig(StrictModel):
    type: Literal[DATA_TYPES] = "jsonl"
    file: str | None = None  # every type but dummy reads one
    ctx_len: Annotated[int, Field(ge=2)] = 512
    loss_mask: Literal["none", "qa", "se"] = "none"
    mask_id: MaskMarkers = Field(default_factory=MaskMarkers)
    # pieces: every ctx_len piece of every document; pad and only (RWKV-PEFT's): each document's first piece only
    dataload: Literal["pieces", "pad", "only"] = "pieces"
    sft_field: Annotated[list[str], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: ["query", "response"])
    sft_split: str = "train"
    eval_file: str | None = None
    holdout_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @field_validator("file", "eval_file")
    @classmethod
    def existing_data(cls, path: str | None, info) -> str | None:
        if path is None or "type" not in info.data:  # a bad type is reported on its own
            return path
        return data_path(path, info.data["type"], info)

    @model_validator(mode="after")
    def consistent(self) -> DataConfig:
        if (self.file is None) != (self.type == "dummy"):
            raise SpecProblem("file", "dummy data makes its own tokens: leave file out" if self.file else "required")
        if self.loss_mask == "qa" and self.type != "jsonl":
            raise SpecProblem("loss_mask", f"qa needs jsonl data ({self.type} has no chat turns)")
        if self.loss_mask == "se" and self.type == "sft":
            raise SpecProblem("loss_mask", "se does not apply to sft data (sft counts the response only)")
        if "mask_id" in self.model_fields_set and self.loss_mask != "se":
            raise SpecProblem("mask_id", "is read only by loss_mask: se")
        if self.dataload != "pieces" and self.type in STREAM_TYPES:
            raise SpecProblem("dataload", f"{self.dataload} takes the first piece of each document, and {self.type} "
                              "data is one token stream: leave dataload at pieces")
        for key in ("sft_field", "sft_split"):
            if key in self.model_fields_set and self.type != "sft":
                raise SpecProblem(key, "is read only by type: sft")
        if self.eval_file and self.holdout_fraction > 0:
            raise SpecProblem("holdout_fraction", "set either eval_file or holdout_fraction, not both")
        return self


class StateConfig(StrictModel):
    init_from: ExistingFile | None = None  # a state file to start from instead of zeros
    # also train where the token shifts of time-mix and channel-mix start (RWKV-PEFT's --train_type fullstate)
    shift: bool = False


class LoraConfig(StrictModel):
    r: PositiveInt = 8
    alpha: PositiveFloat = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.01
    targets: Targets = Field(default_factory=lambda: list(TARGETS))


class PissaConfig(StrictModel):
    r: PositiveInt = 8
    svd_niter: PositiveInt = 4
    targets: Targets = Field(default_factory=lambda: list(TARGETS))


class DishaConfig(StrictModel):
    mode: Literal["bone", "bat"] = "bone"
    r: PositiveInt = 64
    targets: Targets = Field(default_factory=lambda: list(TARGETS))


class PeftConfig(StrictModel):
    method: Literal["state", "lora", "pissa", "disha"] = "state"
    combine_state: bool = False  # train the state together with the weight method
    state: StateConfig = Field(default_factory=StateConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    pissa: PissaConfig = Field(default_factory=PissaConfig)
    disha: DishaConfig = Field(default_factory=DishaConfig)
    quant: Literal["none", "int8", "nf4"] = "none"
    # each saved epoch, beside the adapter file: true, the merged model rwkv-<n>.pth; false, the Hugging Face
    # peft folder <proj_dir>-adapter/ (RWKV-PEFT's --merge 1 / 0). A state-only run writes its state file only.
    merge: bool = True
    train_parts: list[Literal["ln"]] = Field(default_factory=list)  # also train the LayerNorms (RWKV-PEFT's "ln")

    @model_validator(mode="after")
    def used_blocks(self) -> PeftConfig:
        if self.combine_state and self.method == "state":
            raise SpecProblem("combine_state", "needs a weight method (method: lora, pissa or disha)")
        for block in ("lora", "pissa", "disha"):
            if block in self.model_fields_set and block != self.method:
                raise SpecProblem(block, f"given, but peft.method is {self.method}")
        if "state" in self.model_fields_set and self.method != "state" and not self.combine_state:
            raise SpecProblem("state", f"given, but peft.method is {self.method} and combine_state is false")
        if self.state.shift and self.combine_state and self.merge:
            raise SpecProblem("state.shift", "with a weight method and merge on, the state goes into the merged model "
                                             "file, which has no place for the token-shift starts: turn merge off "
                                             "(peft.merge: false, --merge 0) to write the state file beside the "
                                             "adapter")
        if self.train_parts and self.method == "state":
            raise SpecProblem("train_parts", "needs a weight method (method: lora, pissa or disha)")
        if not self.merge and self.method == "disha" and self.disha.mode == "bat":
            raise SpecProblem("merge", "false writes a Hugging Face peft folder, and peft has no form of DiSHA bat "
                                       "(its MiSS bat cuts the weight differently): use merge: true, or mode: bone")
        return self


class OptimConfig(StrictModel):
    lr_init: PositiveFloat = 1e-2
    lr_final: PositiveFloat = 1e-4
    schedule: Literal["cos_decay", "wsd"] = "cos_decay"
    warmup_steps: NonNegativeInt = 0
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.99]
    )
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: NonNegativeFloat = 1.0  # 0 turns clipping off

    @model_validator(mode="after")
    def decreasing(self) -> OptimConfig:
        if self.lr_final > self.lr_init:
            raise SpecProblem("lr_final", f"must be ≤ lr_init ({self.lr_init:g})")
        return self


class TrainerConfig(StrictModel):
    epoch_count: PositiveInt = 1
    epoch_steps: PositiveInt = 1000
    epoch_save: PositiveInt = 1
    micro_bsz: PositiveInt = 1
    grad_accum: PositiveInt = 1
    precision: Literal["bf16", "fp16", "fp32", "tf32"] = "bf16"
    grad_cp: bool = False
    op: Literal["auto", "torch", "cuda", "fla"] = "auto"
    cuda_graph: bool = False  # capture the training step once and replay it (rwkvray/train/graphed_engine.py)
    # long documents (RWKV-PEFT's --train_type infctx): each sample runs in chunks of chunk_ctx tokens, the state
    # passed on; the gradient flows `through` the chunk boundaries, or stops there (`detached`, as RWKV-PEFT)
    chunk_ctx: PositiveInt | None = None
    chunk_grad: Literal["through", "detached"] = "through"
    seed: NonNegativeInt = 42
    proj_dir: str | None = None  # local copy of the outputs; TrainSpec.default_proj_dir fills in the default

    @field_validator("proj_dir")
    @classmethod
    def local_folder(cls, path: str | None) -> str | None:
        if path is not None and is_uri(path):
            raise ValueError("must be a local or shared folder, not a URI")
        return None if path is None else durable_folder(path)


class ScalingConfig(StrictModel):
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def resources(self) -> ScalingConfig:
        for name, amount in self.resources_per_worker.items():
            if name.upper() in ("CPU", "GPU") and name != name.upper():
                message = f"write {name.upper()} (Ray resource names are case-sensitive)"
                raise SpecProblem(f"resources_per_worker.{name}", message)
            if name == "GPU" and amount > 0 and not self.use_gpu:
                raise SpecProblem("resources_per_worker.GPU", "needs use_gpu: true")
        return self


class LoggingConfig(StrictModel):
    wandb_project: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
