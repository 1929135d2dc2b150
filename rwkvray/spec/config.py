"""The job spec: one YAML file, validated with pydantic v2, read by `rwkvray run`, `tune` and `serve`.

Every block rejects unknown keys. Errors are one line that names the spec and the dotted key path, for
example `job.yaml: optim.lr_init: must be > 0`.

Paths: a relative path is resolved against the current working directory when the spec is loaded, and the
spec then holds the absolute path. `ray job submit --working-dir . -- rwkvray run jobs/x.yaml` runs the
entrypoint inside the uploaded copy of `.`, so paths relative to the repository root work there too. Files
that every node must read (model, data) belong in the working dir (small files) or on shared storage.
`run.storage_path` may also be a URI (`s3://...`, `gs://...`), which is kept as written.
"""

from __future__ import annotations

import contextvars
import difflib
import fnmatch
import os
import re
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from rwkvray.model.dims import ModelDims
from rwkvray.errors import RayServeConfigFile, UserError

TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
TUNABLE_KEYS = {  # tune.space key -> (block, field) it sets in each trial
    "lr_init": ("optim", "lr_init"),
    "lr_final": ("optim", "lr_final"),
    "warmup_steps": ("optim", "warmup_steps"),
    "ctx_len": ("data", "ctx_len"),
}
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
GPU_OPS = ("cuda", "fla")
RAY_PACKAGE = re.compile(r"/runtime_resources/working_dir_files/[^/]+")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RAY_SERVE_CONFIG_KEYS = ("applications", "http_options")
# off while `rwkvray validate --no-check-files` loads a spec whose files live on a cluster's disk
CHECK_FILES = contextvars.ContextVar("CHECK_FILES", default=True)


class SpecProblem(ValueError):
    """A validation problem at `key`, a dotted path relative to the model that raises it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


# ---------------------------------------------------------------- field types


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def ray_job_package() -> str | None:
    """The uploaded working dir, when this process is a `ray job submit --working-dir` entrypoint (Ray unpacks
    it under runtime_resources/working_dir_files/ and deletes it with the job)."""
    match = RAY_PACKAGE.search(os.getcwd())
    return os.getcwd()[: match.end()] if match else None


def gitignore_rule(path: str, package: str) -> str | None:
    """The .gitignore line of the uploaded working dir that names `path`: Ray's upload leaves those files out."""
    try:
        with open(os.path.join(package, ".gitignore")) as f:
            rules = [line.strip() for line in f if line.strip() and not line.startswith(("#", "!"))]
    except OSError:
        return None
    parts = os.path.relpath(path, package).split(os.sep)
    for rule in rules:
        pattern = rule.strip("/")
        if rule.startswith("/"):
            candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        else:
            candidates = parts
        if any(fnmatch.fnmatch(candidate, pattern) for candidate in candidates):
            return rule
    return None


def existing_file(path: str) -> str:
    resolved = absolute(path)
    if not CHECK_FILES.get():
        return resolved
    if os.path.isdir(resolved):
        raise ValueError(f"is a folder, not a file: {resolved}")
    if not os.path.isfile(resolved):
        package = ray_job_package()
        rule = package and resolved.startswith(package + os.sep) and gitignore_rule(resolved, package)
        if rule:
            raise ValueError(f"file not found: {resolved} (Ray's --working-dir upload skips what .gitignore names, "
                             f"and {rule!r} names this file: put it on storage every node reads and give its "
                             "absolute path)")
        raise ValueError(f"file not found: {resolved}")
    return resolved


def durable_folder(path: str) -> str:
    """An output folder. Inside a Ray job's uploaded working dir, a relative one would vanish with the job: it is
    resolved against ~/rwkvray instead (./runs -> ~/rwkvray/runs)."""
    if is_uri(path):
        return path
    if ray_job_package() and not os.path.isabs(os.path.expanduser(path)):
        return absolute(os.path.join("~", "rwkvray", path))
    return absolute(path)


def strict_choice(*values):
    """Reject bools where ints are meant and ints where bools are meant (Literal alone lets 1 == True pass)."""

    def check(value):
        if any(value == v and type(value) is type(v) for v in values):
            return value
        spelled = [short_repr(v) for v in values]
        expected = ", ".join(spelled[:-1]) + " or " + spelled[-1]
        raise PydanticCustomError("literal_error", "bad choice", {"expected": expected})

    return BeforeValidator(check)


ExistingFile = Annotated[str, AfterValidator(existing_file)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Target = Literal["att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"]


def unique_targets(targets: list[str]) -> list[str]:
    for target in targets:
        if targets.count(target) > 1:
            raise ValueError(f"{target!r} is listed twice")
    return targets


Targets = Annotated[list[Target], Field(min_length=1), AfterValidator(unique_targets)]


class StrictModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, validate_default=True, protected_namespaces=()
    )


# ---------------------------------------------------------------- blocks


class RunConfig(StrictModel):
    name: str = "rwkvray"
    storage_path: Annotated[str, AfterValidator(durable_folder)] = "./runs"
    checkpoint_every_steps: PositiveInt | None = None  # None: checkpoint every trainer.epoch_save epochs
    keep_checkpoints: PositiveInt = 2
    max_failures: int = 0  # -1: retry forever

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

    path: ExistingFile
    version: Literal["x070", "x060"] | None = None  # RWKV-7 or RWKV-6; the checkpoint's keys decide, this checks
    n_layer: PositiveInt | None = None
    n_embd: PositiveInt | None = None
    head_size: PositiveInt | None = None
    vocab_size: PositiveInt | None = None


def data_path(path: str, data_type: str | None) -> str:
    """A jsonl file must exist; a binidx prefix (with or without .bin/.idx) needs both its .bin and .idx."""
    if data_type != "binidx":
        resolved = absolute(path)
        binidx_instead = not os.path.exists(resolved) and os.path.isfile(resolved + ".bin")
        if data_type == "jsonl" and CHECK_FILES.get() and binidx_instead:
            raise ValueError(f"file not found: {resolved} ({resolved}.bin exists: set data.type: binidx)")
        return existing_file(path)
    prefix = absolute(path)
    for extension in (".bin", ".idx"):
        prefix = prefix.removesuffix(extension)
    for needed in (prefix + ".bin", prefix + ".idx"):
        if CHECK_FILES.get() and not os.path.isfile(needed):
            raise ValueError(f"binidx file not found: {needed}")
    return prefix


class DataConfig(StrictModel):
    type: Literal["jsonl", "binidx"] = "jsonl"
    file: str
    ctx_len: Annotated[int, Field(ge=2)] = 512
    loss_mask: Literal["none", "qa"] = "none"
    eval_file: str | None = None
    holdout_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @field_validator("file", "eval_file")
    @classmethod
    def existing_data(cls, path: str | None, info) -> str | None:
        if path is None or "type" not in info.data:  # a bad type is reported on its own
            return path
        return data_path(path, info.data["type"])

    @model_validator(mode="after")
    def consistent(self) -> DataConfig:
        if self.loss_mask == "qa" and self.type == "binidx":
            raise SpecProblem("loss_mask", "qa needs jsonl data (binidx holds tokens only)")
        if self.eval_file and self.holdout_fraction > 0:
            raise SpecProblem("holdout_fraction", "set either eval_file or holdout_fraction, not both")
        return self


class StateConfig(StrictModel):
    init_from: ExistingFile | None = None  # a state file to start from instead of zeros


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
    seed: NonNegativeInt = 42
    proj_dir: str | None = None  # local copy of the outputs; default: <storage_path>/<name>, or ./runs/<name>

    @field_validator("proj_dir")
    @classmethod
    def local_folder(cls, path: str | None) -> str | None:
        if path is not None and is_uri(path):
            raise ValueError("must be a local or shared folder, not a URI")
        return None if path is None else durable_folder(path)


class DeepSpeedBlock(StrictModel):
    stage: Annotated[Literal[0, 1, 2, 3], strict_choice(0, 1, 2, 3)] = 1
    offload: bool = False  # ZeRO-Offload of the optimizer to CPU memory
    config: dict[str, Any] | None = None  # raw DeepSpeed config merged over the generated one

    @model_validator(mode="before")
    @classmethod
    def from_strategy(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "strategy" not in data:
            return data
        data = dict(data)
        strategy = data.pop("strategy")
        for key in ("stage", "offload"):
            if key in data:
                raise SpecProblem(key, "set either strategy or stage/offload, not both")
        if not isinstance(strategy, str):
            raise SpecProblem("strategy", f"must be a string (got {short_repr(strategy)})")
        data["stage"], data["offload"] = parse_strategy(strategy)
        return data

    @model_validator(mode="after")
    def legal(self) -> DeepSpeedBlock:
        if self.offload and self.stage == 0:
            raise SpecProblem("offload", "needs stage 1, 2 or 3 (stage 0 has no ZeRO optimizer to offload)")
        owned = owned_keys(self.config or {})
        if owned:
            path, owner = owned[0]
            raise SpecProblem(f"config.{path}", f"not allowed here: set {owner} instead")
        return self


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


class SchedulerConfig(StrictModel):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1  # in reports (one every tune.eval_every_steps steps)
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    max_t: PositiveInt | None = None  # in reports; None: the whole run

    @model_validator(mode="after")
    def ordered(self) -> SchedulerConfig:
        if self.max_t is not None and self.max_t < self.grace_period:
            raise SpecProblem("max_t", f"must be ≥ grace_period ({self.grace_period})")
        return self


class TuneConfig(StrictModel):
    metric: Literal["val_loss", "train_loss"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: PositiveInt = 4
    max_concurrent_trials: PositiveInt = 2
    gpus_per_trial: NonNegativeFloat = 0.0
    cpus_per_trial: PositiveFloat = 1.0
    space: dict[str, dict[str, list]]  # {lr_init: {loguniform: [1e-3, 1e-1]}}; randint's high is exclusive
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    eval_every_steps: PositiveInt = 10

    @field_validator("space", mode="before")
    @classmethod
    def search_space(cls, space: Any) -> Any:
        if not isinstance(space, dict):
            raise ValueError(f"must be a mapping (got {short_repr(space)})")
        if not space:
            raise ValueError(f"must name at least one of {', '.join(TUNABLE_KEYS)}")
        return {key: parse_distribution(key, value) for key, value in space.items()}

    @field_validator("gpus_per_trial")
    @classmethod
    def whole_above_one(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError("above 1 it must be a whole number (Ray shares only fractions of one GPU)")
        return gpus


class ServeConfig(StrictModel):
    model: ExistingFile
    model_name: str | None = None  # default: the model file's stem
    states_dir: Annotated[str, AfterValidator(absolute)] = "./states"  # created by the server if missing
    replicas: PositiveInt = 1
    max_mounted_states: PositiveInt = 8  # per replica (LRU)
    max_batch_size: PositiveInt = 8
    batch_wait_ms: NonNegativeFloat = 10.0
    api_key_env: str | None = None  # name of the env var holding the API key; None: no auth
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_tokens_cap: PositiveInt = 1024
    max_prompt_tokens: PositiveInt = 8192
    max_upload_mb: PositiveFloat = 64.0
    use_gpu: Annotated[Literal["auto", True, False], strict_choice("auto", True, False)] = "auto"
    default_temperature: Annotated[float, Field(ge=0)] = 1.0
    default_top_p: Annotated[float, Field(gt=0, le=1)] = 0.3
    default_max_tokens: PositiveInt = 256
    op: Literal["auto", "torch", "cuda", "fla"] = "auto"  # WKV kernel; auto: GPU kernels on GPU
    prefill_chunk: PositiveInt = 256  # prompt tokens per engine step, shared by the prompts being prefilled
    prefix_cache_mb: NonNegativeFloat = 512.0  # states after cached prompt prefixes, per replica; 0: off

    @field_validator("api_key_env")
    @classmethod
    def env_name(cls, name: str | None) -> str | None:
        if name is not None and not ENV_NAME.fullmatch(name):
            raise ValueError(f"must be an environment variable name like RWKVRAY_API_KEY (got {name!r})")
        return name

    @model_validator(mode="after")
    def defaults(self) -> ServeConfig:
        if os.path.isfile(self.states_dir):
            raise SpecProblem("states_dir", f"is a file, not a folder: {self.states_dir}")
        if self.default_max_tokens > self.max_tokens_cap:
            raise SpecProblem("default_max_tokens", f"must be ≤ max_tokens_cap ({self.max_tokens_cap})")
        if self.op in GPU_OPS and self.use_gpu is False:
            raise SpecProblem("op", f"{self.op} needs a GPU (set use_gpu: true or auto, or op: torch)")
        if self.model_name is None:
            self.model_name = os.path.splitext(os.path.basename(self.model))[0]
        return self


class JobSpec(StrictModel):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig | None = None  # model and data: required to train or tune
    data: DataConfig | None = None
    peft: PeftConfig = Field(default_factory=PeftConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedBlock = Field(default_factory=DeepSpeedBlock)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tune: TuneConfig | None = None
    serve: ServeConfig | None = None
    _source: str = PrivateAttr(default="<spec>")

    @property
    def source(self) -> str:
        """Where the spec came from (a file path, or 'train flags'), for error messages."""
        return self._source

    @model_validator(mode="after")
    def consistent(self) -> JobSpec:
        if (self.model is None) != (self.data is None):
            raise SpecProblem("data" if self.data is None else "model", "required (model and data go together)")
        if self.model is None and self.serve is None:
            raise SpecProblem("model", "required (or a serve block for a serving-only spec)")
        self.check_hardware()
        self.check_cuda_graph()
        self.fill_proj_dir()
        if self.tune is not None and self.data is not None:
            self.check_tune()
        return self

    def check_hardware(self) -> None:
        if self.scaling.use_gpu:
            return
        if self.trainer.op in GPU_OPS:
            raise SpecProblem("trainer.op", f"{self.trainer.op} needs a GPU (set scaling.use_gpu: true, or op: torch)")
        if self.trainer.precision == "fp16":
            raise SpecProblem("trainer.precision", "fp16 needs a GPU (set scaling.use_gpu: true, or use bf16/fp32)")
        if self.deepspeed.offload:
            raise SpecProblem(
                "deepspeed.offload", "needs scaling.use_gpu: true (on CPU the optimizer already lives in host memory)"
            )
        if self.tune is not None and self.tune.gpus_per_trial > 0:
            raise SpecProblem("tune.gpus_per_trial", "needs scaling.use_gpu: true")

    def check_cuda_graph(self) -> None:
        """A captured step has one shape, one micro-batch per optimizer step and no DeepSpeed around it."""
        if not self.trainer.cuda_graph:
            return
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

    def fill_proj_dir(self) -> None:
        """The driver's local copy of the outputs: storage_path/name itself when that is a folder."""
        if self.trainer.proj_dir is None:
            local_root = "./runs" if is_uri(self.run.storage_path) else self.run.storage_path
            self.trainer.proj_dir = durable_folder(os.path.join(local_root, self.run.name))

    def check_tune(self) -> None:
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


# ---------------------------------------------------------------- tune search space


def parse_distribution(key: str, value: Any) -> dict[str, list]:
    """One search-space entry as {kind: args}, checked against what `key` accepts."""
    if key not in TUNABLE_KEYS:
        raise SpecProblem(key, f"not tunable (use {', '.join(TUNABLE_KEYS)})")
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecProblem(key, "must be one distribution, e.g. {loguniform: [1e-3, 1e-1]}")
    (kind, args), = value.items()
    if kind not in DISTRIBUTIONS:
        raise SpecProblem(key, f"unknown distribution {kind!r} (use {', '.join(DISTRIBUTIONS)})")
    is_lr = key.startswith("lr_")
    if is_lr and kind == "randint":
        raise SpecProblem(key, "randint gives integers; use loguniform, uniform or choice")
    if not is_lr and kind in ("loguniform", "uniform"):
        raise SpecProblem(key, f"{kind} gives fractions; use randint or choice")
    if not isinstance(args, list) or not args:
        raise SpecProblem(key, f"{kind} needs a non-empty list")
    number = (int, float) if is_lr else int
    if any(isinstance(a, bool) or not isinstance(a, number) for a in args):
        raise SpecProblem(key, f"{kind} values must be {'numbers' if is_lr else 'integers'} (got {args})")
    if kind != "choice" and (len(args) != 2 or not args[0] < args[1]):
        raise SpecProblem(key, f"{kind} needs [low, high] with low < high (got {args})")
    minimum = {"lr_init": 0, "lr_final": 0, "warmup_steps": 0, "ctx_len": 2}[key]
    if is_lr and min(args) <= 0:
        raise SpecProblem(key, f"learning rates must be > 0 (got {args})")
    if min(args) < minimum:
        raise SpecProblem(key, f"values must be ≥ {minimum} (got {args})")
    return {kind: list(args)}


def sampled_range(distribution: dict[str, list] | None, fixed: float) -> tuple[float, float]:
    if distribution is None:
        return fixed, fixed
    (kind, args), = distribution.items()
    if kind == "randint":
        return args[0], args[1] - 1
    return min(args), max(args)


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


def spec_for_trial(spec: JobSpec, trial_config: dict[str, Any]) -> JobSpec:
    """The spec with one trial's sampled values (keys of tune.space) put in place, validated again."""
    data = spec.model_dump(mode="json", exclude_unset=True)
    for key, value in trial_config.items():
        if key not in TUNABLE_KEYS:
            raise UserError(f"{spec.source}: tune trial config has unknown key {key!r}")
        block, field = TUNABLE_KEYS[key]
        data.setdefault(block, {})[field] = value
    return spec_from_dict(data, spec.source)


# ---------------------------------------------------------------- DeepSpeed


STRATEGY = re.compile(r"deepspeed_stage_([0-3])(_offload)?")
DATA_PARALLEL_STRATEGIES = (
    "auto", "ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "single_device"
)


def parse_strategy(strategy: str) -> tuple[int, bool]:
    match = STRATEGY.fullmatch(strategy)
    if match:
        return int(match.group(1)), bool(match.group(2))
    if strategy == "deepspeed":  # Lightning's plain "deepspeed" strategy is ZeRO stage 2
        return 2, False
    if strategy in DATA_PARALLEL_STRATEGIES:  # plain data parallel, as ZeRO stage 0
        return 0, False
    raise SpecProblem(
        "strategy",
        f"unknown strategy {strategy!r} (use deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_2_offload, "
        "deepspeed_stage_3, deepspeed_stage_3_offload, deepspeed or ddp)",
    )


def strategy_to_deepspeed(strategy: str) -> tuple[int, bool]:
    """An RWKV-PEFT / Lightning --strategy string as (ZeRO stage, optimizer offload)."""
    try:
        return parse_strategy(strategy)
    except SpecProblem as problem:
        raise UserError(problem.message) from None


OWNED_DEEPSPEED_KEYS = {
    "optimizer": "the optim block",
    "scheduler": "the optim block",
    "train_batch_size": "trainer.micro_bsz and trainer.grad_accum",
    "train_micro_batch_size_per_gpu": "trainer.micro_bsz",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.stage",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
}


def owned_keys(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Keys of a raw DeepSpeed config that other spec blocks own, with the spec key to use instead."""
    found = []
    for path, owner in OWNED_DEEPSPEED_KEYS.items():
        node: Any = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            found.append((path, owner))
    return found


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(spec: JobSpec) -> dict[str, Any]:
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


# ---------------------------------------------------------------- checks used by the commands


def require_training_blocks(spec: JobSpec) -> tuple[ModelConfig, DataConfig]:
    """The model and data blocks, which `run` and `tune` need."""
    if spec.model is None or spec.data is None:
        raise UserError(f"{spec.source}: model: required to train or tune (this spec has only a serve block)")
    return spec.model, spec.data


def require_tune_block(spec: JobSpec) -> TuneConfig:
    require_training_blocks(spec)
    if spec.tune is None:
        raise UserError(f"{spec.source}: tune: required for rwkvray tune")
    return spec.tune


def require_serve_block(spec: JobSpec) -> ServeConfig:
    if spec.serve is None:
        raise UserError(f"{spec.source}: serve: required for rwkvray serve")
    return spec.serve


def check_model_expectations(model: ModelConfig, dims: ModelDims, source: str) -> None:
    """Compare the spec's optional version/n_layer/n_embd/head_size/vocab_size with the checkpoint's real ones."""
    mismatches = [
        f"{name}={getattr(dims, name)} but the spec expects {getattr(model, name)}"
        for name in ("version", "n_layer", "n_embd", "head_size", "vocab_size")
        if getattr(model, name) is not None and getattr(model, name) != getattr(dims, name)
    ]
    if mismatches:
        raise UserError(f"{source}: model {model.path} has {'; '.join(mismatches)}")


# ---------------------------------------------------------------- loading and error messages


def load_spec(path: str, check_files: bool = True) -> JobSpec:
    """Read and validate a YAML job spec; every problem becomes a one-line UserError.
    check_files=False accepts paths to files that are not on this machine."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a spec file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"spec file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=SpecLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else path
        kind = "" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error: "  # e.g. a duplicate key
        raise UserError(f"{where}: {kind}{e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: YAML error: {str(e).splitlines()[0]}") from None
    if data is None:
        raise UserError(f"{path}: the spec is empty (expected blocks such as model, data, trainer)")
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: the top level must be a mapping of blocks (model, data, ...), not a {yaml_type(data)}"
        )
    found = [key for key in RAY_SERVE_CONFIG_KEYS if key in data]
    if found:
        raise RayServeConfigFile(f"{path}: this is a Ray Serve config file (it has {' and '.join(found)}), not an "
                                 f"rwkvray job spec: start it with `serve run {path}`, or `serve deploy {path}` "
                                 "on a running cluster")
    return spec_from_dict(data, path, check_files=check_files)


def spec_from_dict(data: dict, source: str, key_names: dict[str, str] | None = None,
                   check_files: bool = True) -> JobSpec:
    """Validate a spec given as a dict. key_names renames key paths in messages (e.g. to command-line flags)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the spec must be a mapping (got {yaml_type(data)})")
    blocks = {key: value for key, value in data.items() if value is not None}  # `optim:` alone means defaults
    token = CHECK_FILES.set(check_files)
    try:
        spec = JobSpec.model_validate(blocks)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, key_names)) from None
    finally:
        CHECK_FILES.reset(token)
    spec._source = source
    return spec


def format_validation_error(err: ValidationError, source: str, key_names: dict[str, str] | None = None) -> str:
    """ONE line: `{source}: optim.lr_init: must be > 0`, several problems joined with '; '."""
    names = key_names or {}
    problems = [f"{names.get(path, path)}: {message}" for path, message in validation_problems(err)]
    return f"{source}: " + "; ".join(problems)


def validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    """(dotted key path, message) for each pydantic error, with pydantic's wording replaced by ours."""
    problems = []
    for error in err.errors():
        loc = list(error["loc"])
        problem = (error.get("ctx") or {}).get("error")
        if isinstance(problem, SpecProblem):
            loc += problem.key.split(".")
        path = dotted(loc)
        problems.append((path or "(top level)", describe(error, loc)))
    return problems


def dotted(loc: list) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
    "list": "a list",
}


def describe(error: dict, loc: list) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "value_error":
        problem = ctx.get("error")
        return problem.message if isinstance(problem, SpecProblem) else str(problem)
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key" + suggestion(loc)
    if kind == "literal_error":
        return f"must be one of {', '.join(choices(ctx['expected']))} (got {short_repr(error['input'])})"
    bounds = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit:g}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} items"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} items"
    if kind == "finite_number":
        return "must be a finite number"
    for prefix, words in TYPE_WORDS.items():
        if kind in (f"{prefix}_type", f"{prefix}_parsing", f"{prefix}_from_float"):
            return f"must be {words} (got {short_repr(error['input'])})"
    return error["msg"]


def choices(expected: str) -> list[str]:
    """pydantic's "'a', 'b' or 'c'" as ['a', 'b', 'c'], unquoted; True/False written the YAML way."""
    parts = re.split(r", | or ", expected)
    return [{"True": "true", "False": "false"}.get(p.strip("'"), p.strip("'")) for p in parts]


def suggestion(loc: list) -> str:
    """' (did you mean X?)' when the unknown key at loc is close to a real one."""
    model: Any = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field and nested_model(field.annotation)
        if not model:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = (annotation, *get_args(annotation))
    return next((t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), None)


def short_repr(value: Any) -> str:
    """The value as YAML spells it (true, null), cut to 40 characters."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def yaml_type(value: Any) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- YAML


class SpecLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-2 as a float (YAML 1.1 wants 1.0e-2) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
