"""The OpenAI-compatible surface: request models, response bodies, the error shape, body reading (size-capped
JSON, base64 and multipart) and SSE streaming. Web-framework free, so it is tested without Ray.

Errors always have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. Unknown request fields are
ignored, as OpenAI's own server ignores what a client may send (user, presence_penalty, ...), except those
that would change the answer in a way this server cannot honour (n > 1, logprobs), which are refused.
"""
from __future__ import annotations

import base64
import binascii
import email.message
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4
MAX_JSON_BYTES = 8 * 2**20  # request bodies other than state uploads
INT64 = (-2**63, 2**63 - 1)  # the sampler's torch.Generator takes a 64-bit seed


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
    stop: list[str] = Field(default_factory=list)  # a single string is accepted too
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = 1
    logprobs: Optional[Any] = None
    seed: Optional[int] = None

    @field_validator("stop", mode="before")
    @classmethod
    def stop_list(cls, stop):
        return [] if stop is None else [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def stop_limits(cls, stops: list[str]) -> list[str]:
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("seed")
    @classmethod
    def int64_seed(cls, seed: Optional[int]) -> Optional[int]:
        if seed is not None and not INT64[0] <= seed <= INT64[1]:
            raise ValueError(f"must be an integer from {INT64[0]} to {INT64[1]} (int64)")
        return seed

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


# ---------------------------------------------------------------- request bodies and streaming


async def read_body(request, limit: int, too_large: ApiError) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (declared or actual)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request) -> dict:
    too_large = ApiError(413, f"the request body is larger than {MAX_JSON_BYTES // 2**20} MiB",
                         "invalid_request_error", None, "request_too_large")
    return json_object(await read_body(request, MAX_JSON_BYTES, too_large))


def json_object(body: bytes, what: str = "the body", param: Optional[str] = None) -> dict:
    """`body` parsed as a JSON object; `what` and `param` name it in the 400 (a multipart field, say)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad_request(f"{what} is not valid JSON ({err})", param) from None
    if not isinstance(payload, dict):
        raise bad_request(f"{what} must be a JSON object", param)
    return payload


def decode_base64(data: Any) -> bytes:
    if not isinstance(data, str):
        raise bad_request("`data` must be a base64 string", "data")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("`data` is not valid base64", "data") from None


def header_param(header: str, value: str, param: str) -> Optional[str]:
    message = email.message.Message()
    message[header] = value
    return message.get_param(param, header=header)


def multipart_fields(body: bytes, content_type: str) -> dict[str, bytes]:
    """The fields of a multipart/form-data body by name (RFC 7578), without extra dependencies."""
    boundary = header_param("content-type", content_type, "boundary")
    if not boundary:
        raise bad_request("multipart body without a boundary")
    fields = {}
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, found, payload = part.partition(b"\r\n\r\n")
        if not found:
            raise bad_request("malformed multipart part (no blank line after its headers)")
        headers = dict(line.decode("latin-1").split(":", 1) for line in head.split(b"\r\n") if b":" in line)
        disposition = next((v for k, v in headers.items() if k.strip().lower() == "content-disposition"), "")
        name = header_param("content-disposition", disposition.strip(), "name")
        if name:
            fields[name] = payload.removesuffix(b"\r\n")
    return fields


def strip_reply_space(text: str) -> str:
    """The chat template ends with `Assistant:` and the model answers ` text`: drop that one space."""
    return text.removeprefix(" ")


async def sse_events(request_id: str, model: str, first, rest, chat: bool,
                     include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's streaming format, ending with `data: [DONE]`."""
    def event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        yield event(chat_chunk(request_id, model, {"role": "assistant", "content": ""}, None))
    at_start, last = True, first
    try:
        async for chunk in prepend(first, rest):
            last = chunk
            text = chunk.text
            if chat and at_start and text:
                text, at_start = strip_reply_space(text), False
            if text or chunk.finish_reason:
                if chat:
                    delta = {"content": text} if text else {}
                    yield event(chat_chunk(request_id, model, delta, chunk.finish_reason))
                else:
                    yield event(completion_body(request_id, model, text, chunk.finish_reason))
    except Exception as err:  # the status line is gone; tell the client in the stream itself
        status = err.status if isinstance(err, ApiError) else 500
        message = err.message if isinstance(err, ApiError) else f"internal error: {type(err).__name__}"
        yield event(ApiError(status, message, "server_error" if status >= 500 else "invalid_request_error").body())
        return
    if include_usage:
        counts = usage(last.prompt_tokens, last.completion_tokens)
        yield event({"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model, "choices": [], "usage": counts})
    yield "data: [DONE]\n\n"


async def prepend(first, rest) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item
