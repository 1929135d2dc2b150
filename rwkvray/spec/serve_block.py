"""The serve block: what `rwkvray serve` and the Ray Serve application read."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from rwkvray.spec.fields import (GPU_OPS, InputFile, NonNegativeFloat, PositiveFloat, PositiveInt, StrictModel,
                                 strict_choice)
from rwkvray.spec.paths import folder_or_uri
from rwkvray.spec.wording import SpecProblem, short_repr

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def count_or_auto(value):
    """A whole number ≥ 1 or "auto" (one message for both, not one per member of the union)."""
    if value == "auto" or (type(value) is int and value >= 1):
        return value
    raise ValueError(f"must be ≥ 1, or auto (got {short_repr(value)})")


class ServeConfig(StrictModel):
    model: InputFile
    model_name: str | None = None  # default: the model file's stem (named_after_model)
    # a folder (created by the server if missing) or a URI (s3://, gs://) that every replica and node reads
    states_dir: Annotated[str, AfterValidator(folder_or_uri)] = "./states"
    replicas: PositiveInt = 1
    # CPUs each model replica reserves, and torch's threads in it; auto: every CPU of the largest node when one
    # CPU replica serves, 1 each for several, none reserved for a GPU replica
    num_cpus: Annotated[int | Literal["auto"], BeforeValidator(count_or_auto)] = "auto"
    max_mounted_states: PositiveInt = 8  # per replica (LRU)
    max_batch_size: PositiveInt = 8
    batch_wait_ms: NonNegativeFloat = 10.0
    api_key_env: str | None = None  # name of the env var holding the API key; None: no auth
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_tokens_cap: PositiveInt = 1024
    max_prompt_tokens: PositiveInt = 8192
    max_eval_rows: PositiveInt = 1000  # rows per POST /v1/evals
    max_upload_mb: PositiveFloat = 64.0
    use_gpu: Annotated[Literal["auto", True, False], strict_choice("auto", True, False)] = "auto"
    default_temperature: Annotated[float, Field(ge=0)] = 1.0
    default_top_p: Annotated[float, Field(gt=0, le=1)] = 0.3
    default_max_tokens: PositiveInt = 256
    op: Literal["auto", "torch", "cuda", "fla"] = "auto"  # WKV kernel; auto: GPU kernels on GPU
    prefill_chunk: PositiveInt = 256  # prompt tokens per engine step, shared by the prompts being prefilled
    # a streamed reply's text is sent at most this often (the first token at once): fewer hops per token
    stream_interval_ms: NonNegativeFloat = 200.0
    # all streamed replies of a replica together send at most this many chunks a second: with many streams,
    # each waits longer than stream_interval_ms (up to 1 s), so the messages do not slow the model's steps
    stream_chunks_per_s: PositiveFloat = 20.0
    prefix_cache_mb: NonNegativeFloat = 512.0  # states after cached prompt prefixes, per replica; 0: off

    @field_validator("model_name")
    @classmethod
    def named_after_model(cls, name: str | None, info) -> str | None:
        """Default: the model file's stem (validate_default runs this on the default too)."""
        if name is None and "model" in info.data:
            return os.path.splitext(os.path.basename(info.data["model"]))[0]
        return name

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
        return self
