"""The OpenAI-compatible surface: request models, response bodies and the error shape.

Errors always have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. Unknown request fields are
ignored, as OpenAI's own server ignores what a client may send (user, presence_penalty, ...), except those
that would change the answer in a way this server cannot honour (n > 1, logprobs), which are refused.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An HTTP error in OpenAI's shape. All fields live in `args` so the error pickles across Ray actors."""

    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(status, message, err_type, param, code)
        self.status, self.message, self.err_type, self.param, self.code = status, message, err_type, param, code

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


def not_found(message: str, code: str = "model_not_found") -> ApiError:
    return ApiError(404, message, "invalid_request_error", "model", code)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


class OpenAIRequest(BaseModel):
    """Fields shared by completions and chat completions; None means the server's configured default."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    n: int = 1
    logprobs: Optional[Any] = None
    seed: Optional[int] = None

    @field_validator("stop")
    @classmethod
    def stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("n")
    @classmethod
    def single_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, logprobs):
        if logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return logprobs


class CompletionRequest(OpenAIRequest):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, prompt) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt string is supported")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("must not be empty")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


def parse_request(model_cls: type[OpenAIRequest], data: Any) -> OpenAIRequest:
    """Validate a JSON body; the first problem becomes a 400 naming the field (OpenAI's `param`)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        problem = err.errors()[0]
        param = ".".join(str(part) for part in problem["loc"]) or None
        message = problem["msg"].removeprefix("Value error, ")
        raise bad_request(f"{param}: {message}" if param else message, param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, text: str, finish_reason: Optional[str],
                    usage_: Optional[dict] = None) -> dict:
    """A whole completion, or (with usage_ None) one streamed chunk of it."""
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_body(request_id: str, model: str, text: str, finish_reason: Optional[str], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: Optional[str]) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "rwkvray"}
