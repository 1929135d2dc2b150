"""The Ray Serve application: an OpenAI-compatible endpoint for one base RWKV model and its tuned states.

Three deployments:
- `Gateway`, the FastAPI ingress: auth, request checks, tokenization, OpenAI shapes, SSE streaming.
- `StateRegistry` (one replica): which states are mounted, and their tensors (see states.py for the rules).
- `StateModel` (`replicas` of them): the base model, loaded once per replica, and the batching engine. It
  caches states with `@serve.multiplexed` under ids `NAME@VERSION` fetched from the registry, so Serve routes a
  state's requests to replicas that already hold it; one batch still mixes rows of any states.

The registry is off the hot path: the gateway keeps `name -> NAME@VERSION` and asks the registry only on a
miss. Mounts, uploads, blends and unmounts go through the gateway, which updates its map at once, so a DELETE
is a 404 for the very next request; an id gone stale in another way (a registry restart) answers 404 from the
model replica, and the gateway then resolves the name once more.

`build_app(config, api_key)` returns the bound application. The driver side, `rwkvray serve SPEC.yaml` and the
import path for `serve run` / `serve deploy`, is rwkvray/launch/serving.py.
"""

import hmac
import os
import time
from typing import AsyncIterator, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rwkvray.eval.scoring import evaluate
from rwkvray.model.checkpoint import load_checkpoint
from rwkvray.spec import ServeConfig
from rwkvray.text.chat import REPLY_END, render_chat
from rwkvray.model.dims import RWKVDims
from rwkvray.errors import UserError
from rwkvray.model.rwkv import load_model, pick_device
from rwkvray.serve.api import (ApiError, ChatCompletionRequest, CompletionRequest, OpenAIRequest, bad_request,
                               chat_body, completion_body, decode_base64, json_object, model_card, multipart_fields,
                               new_id, parse_request, read_body, read_json, sse_events, strip_reply_space, usage)
from rwkvray.serve.bodies import check_mount_options, multipart_payload, refuse_unknown_keys
from rwkvray.engine.batch_engine import BatchEngine, Chunk, SamplingParams
from rwkvray.serve.evals import run_evals
from rwkvray.engine.metrics import EngineMetrics, mounted_states_gauge
from rwkvray.serve.page import add_playground
from rwkvray.serve.states import StateStore, check_name, upload_too_large
from rwkvray.files.cache import local_copy
from rwkvray.model.state_card import base_fingerprint
from rwkvray.model.tuned_state import TunedState
from rwkvray.text.tokenizer import get_tokenizer

APP_NAME = "rwkvray"
BASE64_OVERHEAD = 4 / 3
ENGINE_QUEUE_FACTOR = 2  # requests a model replica accepts per batch slot (the extra ones wait to join)
BASE_STATE_KEY = "@base"  # the prefix cache's name for the base model's own state (not a state name)

# no /docs, /redoc or /openapi.json: they would list every route to callers without the API key
fastapi_app = FastAPI(title="rwkvray", docs_url=None, redoc_url=None, openapi_url=None)
add_playground(fastapi_app)


@fastapi_app.exception_handler(ApiError)
async def api_error_response(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@fastapi_app.exception_handler(StarletteHTTPException)
async def http_error_response(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)


@fastapi_app.exception_handler(Exception)
async def server_error_response(request: Request, err: Exception) -> JSONResponse:
    return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", "server_error").body(),
                        status_code=500)


# ---------------------------------------------------------------- deployments


REGISTRY_CALLS = ("resolve", "fetch", "mount", "upload", "blend", "unmount", "listing", "servable_names", "info")


@serve.deployment
class StateRegistry:
    """The single source of truth for mounted states: one StateStore behind one replica.

    A refusal (404, 400, ...) comes back as an ApiError value rather than an exception: it is an answer, not
    a failure, and Serve would log a traceback for every raised one.
    """

    def __init__(self, states_dir: str, dims: RWKVDims, base_name: str, max_upload_bytes: int, base: dict):
        self.store = StateStore(states_dir, dims, base_name, max_upload_bytes, base)
        self.mounted_gauge = mounted_states_gauge()

    async def call(self, method: str, *args):
        if method not in REGISTRY_CALLS:
            raise ValueError(f"unknown registry call {method!r}")
        try:
            return getattr(self.store, method)(*args)
        except ApiError as err:
            return err
        finally:
            self.mounted_gauge.set(len(self.store.mounted))


async def ask_registry(registry, method: str, *args):
    """A StateRegistry call whose ApiError answer is raised here, in the caller."""
    answer = await registry.call.remote(method, *args)
    if isinstance(answer, ApiError):
        raise answer
    return answer


@serve.deployment
class StateModel:
    def __init__(self, config: ServeConfig, registry, threads: Optional[int]):
        # Only the engine's worker runs torch with `threads` (the CPUs the replica reserved). Each thread that
        # runs parallel ops gets its own OpenMP team; with two teams on the replica's cores libgomp stops
        # spinning between ops, and a 0.19B step on 2 cores took 54 ms instead of 32 ms.
        if threads:
            torch.set_num_threads(1)
        self.device = pick_device("auto")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # once per replica; op "auto" picks the GPU kernels on a GPU
        self.model, merged_state = load_model(local_copy(config.model), self.device, dtype, op=config.op)
        self.base_state = None if merged_state is None else TunedState(merged_state)
        self.registry = registry
        self.engine = BatchEngine(self.model, get_tokenizer(), config.max_batch_size, config.batch_wait_ms / 1000,
                                  prefill_chunk=config.prefill_chunk,
                                  prefix_cache_bytes=int(config.prefix_cache_mb * 2**20),
                                  stream_interval_s=config.stream_interval_ms / 1000,
                                  stream_chunks_per_s=config.stream_chunks_per_s,
                                  metrics=EngineMetrics(export=True), threads=threads)

        async def load_mounted_state(mid: str) -> TunedState:
            """A mounted state's tensors on this replica's device, held by the multiplex LRU cache. Rows already
            running keep their own copies, so an eviction never disturbs them."""
            return (await ask_registry(self.registry, "fetch", mid)).to(self.device)

        # Wired here because the cache size comes from the config.
        self.cached_state = serve.multiplexed(max_num_models_per_replica=config.max_mounted_states)(
            load_mounted_state)

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Streams the chunks of one request, from the state named by the multiplexed model id ("" = base)."""
        tuned, key = await self._tuned_state()
        async for chunk in self.engine.generate(prompt, tuned, params, key):
            yield chunk

    async def complete(self, prompt: list[int], params: SamplingParams) -> Chunk:
        tuned, key = await self._tuned_state()
        return [chunk async for chunk in self.engine.generate(prompt, tuned, params, key, streamed=False)][0]

    async def evaluate(self, items, state_ids: dict, max_tokens: int):
        """POST /v1/evals on this replica: every state (NAME@VERSION, None for the base) in the same batches."""
        states = {name: self.base_state if mid is None else await self.cached_state(mid)
                  for name, mid in state_ids.items()}
        return await evaluate(self.engine, items, states, max_tokens, self.engine.max_batch_size)

    async def stats(self) -> dict:
        return {**self.engine.metrics.snapshot(), "device": str(self.device), "op": self.model.op,
                "torch_threads": self.engine.threads,
                "active_rows": len(self.engine.active), "waiting_rows": len(self.engine.waiting)}

    async def _tuned_state(self) -> tuple[Optional[TunedState], str]:
        """The request's initial state and its prefix-cache key (NAME@VERSION: a re-mount starts afresh)."""
        mid = serve.get_multiplexed_model_id()
        if not mid:
            return self.base_state, BASE_STATE_KEY
        return await self.cached_state(mid), mid


@serve.deployment
@serve.ingress(fastapi_app)
class Gateway:
    def __init__(self, config: ServeConfig, vocab_size: int, api_key: Optional[str], registry, model):
        self.config = config
        self.vocab_size = vocab_size
        self.api_key = api_key
        self.registry = registry
        self.model = model
        self.tokenizer = get_tokenizer()
        self.created = int(time.time())
        self.max_upload_bytes = int(config.max_upload_mb * 2**20)
        self.state_ids: dict[str, str] = {}  # name -> NAME@VERSION, kept current by this gateway's mounts

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self.authorize(request)
        names = [self.config.model_name, *await ask_registry(self.registry, "servable_names")]
        return {"object": "list", "data": [model_card(name, self.created) for name in names]}

    @fastapi_app.get("/v1/states")
    async def states(self, request: Request) -> dict:
        self.authorize(request)
        return await ask_registry(self.registry, "listing")

    @fastapi_app.get("/v1/stats")
    async def stats(self, request: Request) -> dict:
        """The Prometheus figures as JSON, for people without Prometheus (from the replica that answers)."""
        self.authorize(request)
        listing = await ask_registry(self.registry, "listing")
        return {"object": "stats", "model_replica": await self.model.stats.remote(),
                "mounted_states": len(listing["mounted"]), "gateway_state_ids": len(self.state_ids)}

    @fastapi_app.post("/v1/states")
    async def mount_state(self, request: Request) -> dict:
        """JSON {"name"} mounts NAME.pth from states_dir; {"name", "data": base64, "card"?} or multipart (fields
        `name`, `file`, `card`?) uploads a state file; {"name", "blend": {STATE: WEIGHT, ...}} mounts a weighted
        sum of states. `"force": true` mounts a state whose card names another base model; `"replace": true`
        lets an upload or blend replace an existing state (kept as NAME.prev), else that is a 409."""
        self.authorize(request)
        limit = int(self.max_upload_bytes * BASE64_OVERHEAD) + 2**16  # room for base64 or multipart framing
        body = await read_body(request, limit, upload_too_large(self.max_upload_bytes))
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            payload = multipart_payload(multipart_fields(body, content_type))
        else:
            payload = json_object(body)
            refuse_unknown_keys(payload)
            if payload.get("data") is not None:
                payload["data"] = decode_base64(payload["data"])
        name, data, card = check_name(payload.get("name")), payload.get("data"), payload.get("card")
        force, blend, replace = payload.get("force", False), payload.get("blend"), payload.get("replace", False)
        check_mount_options(data, card, force, blend, replace)
        self.state_ids.pop(name, None)
        if blend is not None:
            return await ask_registry(self.registry, "blend", name, blend, replace)
        if data is None:
            return await ask_registry(self.registry, "mount", name, force)
        if len(data) > self.max_upload_bytes:
            raise upload_too_large(self.max_upload_bytes)
        return await ask_registry(self.registry, "upload", name, data, card, force, replace)

    @fastapi_app.get("/v1/states/{name}")
    async def state(self, name: str, request: Request) -> dict:
        self.authorize(request)
        return await ask_registry(self.registry, "info", name)

    @fastapi_app.delete("/v1/states/{name}")
    async def unmount_state(self, name: str, request: Request) -> dict:
        self.authorize(request)
        self.state_ids.pop(check_name(name), None)
        return await ask_registry(self.registry, "unmount", name)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        self.authorize(request)
        req = parse_request(CompletionRequest, await read_json(request))
        return await self.answer(req, req.prompt, "prompt", chat=False)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self.authorize(request)
        req = parse_request(ChatCompletionRequest, await read_json(request))
        try:
            prompt = render_chat([m.model_dump() for m in req.messages], add_generation_prompt=True)
        except UserError as err:
            raise bad_request(str(err), "messages") from None
        return await self.answer(req, prompt, "messages", chat=True)

    @fastapi_app.post("/v1/evals")
    async def evals(self, request: Request) -> dict:
        self.authorize(request)
        return await run_evals(self, await read_json(request))

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send `Authorization: Bearer <key>`)",
                           "invalid_request_error", None, "invalid_api_key")

    async def answer(self, req: OpenAIRequest, prompt: str, prompt_param: str, chat: bool):
        tokens = self.prompt_tokens(prompt, prompt_param)
        params = self.sampling_params(req, chat)
        if req.model == self.config.model_name:
            return await self.respond(self.model, req, tokens, params, chat)
        check_name(req.model, "model")
        cached = req.model in self.state_ids
        try:
            return await self.respond(await self.state_handle(req.model), req, tokens, params, chat)
        except ApiError as err:
            self.state_ids.pop(req.model, None)
            if err.status != 404 or not cached:
                raise
        return await self.respond(await self.state_handle(req.model), req, tokens, params, chat)

    async def state_handle(self, name: str):
        """The model handle routed to a state, its NAME@VERSION from this gateway's map or the registry."""
        if name not in self.state_ids:
            self.state_ids[name] = await ask_registry(self.registry, "resolve", name)
        return self.model.options(multiplexed_model_id=self.state_ids[name])

    async def respond(self, handle, req: OpenAIRequest, tokens: list[int], params: SamplingParams, chat: bool):
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if not req.stream:
            result = await handle.complete.remote(tokens, params)
            text = strip_reply_space(result.text) if chat else result.text
            counts = usage(result.prompt_tokens, result.completion_tokens)
            if chat:
                return chat_body(request_id, req.model, text, result.finish_reason, counts)
            return completion_body(request_id, req.model, text, result.finish_reason, counts)
        chunks = handle.options(stream=True).generate.remote(tokens, params)
        first = await chunks.__anext__()  # errors before the first token still become a plain HTTP error
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        events = sse_events(request_id, req.model, first, chunks, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    def prompt_tokens(self, prompt: str, param: str) -> list[int]:
        tokens = self.tokenizer.encode(prompt)
        if len(tokens) > self.config.max_prompt_tokens:
            raise bad_request(f"the prompt has {len(tokens)} tokens, more than this server's limit of "
                              f"{self.config.max_prompt_tokens}", param, "context_length_exceeded")
        outside = [t for t in tokens if t >= self.vocab_size]
        if outside:
            raise bad_request(f"prompt token id {outside[0]} is outside the model's vocab of {self.vocab_size}",
                              param)
        return tokens

    def sampling_params(self, req: OpenAIRequest, chat: bool) -> SamplingParams:
        config = self.config
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or config.default_max_tokens
        if max_tokens > config.max_tokens_cap:
            raise bad_request(f"max_tokens is {max_tokens}, more than this server's limit of "
                              f"{config.max_tokens_cap}", "max_tokens")
        temperature = config.default_temperature if req.temperature is None else req.temperature
        top_p = config.default_top_p if req.top_p is None else req.top_p
        stop = req.stop + ([REPLY_END] if chat else [])  # a chat reply ends where the next user turn begins
        return SamplingParams(max_tokens, temperature, top_p, stop, req.seed)


# ---------------------------------------------------------------- building and running


def use_gpu(config: ServeConfig) -> bool:
    if config.use_gpu != "auto":
        return config.use_gpu
    import ray
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    return torch.cuda.is_available()


def replica_cpus(config: ServeConfig, gpu: bool) -> int:
    """CPUs one model replica reserves (see serve.num_cpus). One CPU replica gets a whole node: torch's threads
    then use every core instead of one while the rest sit idle."""
    if config.num_cpus != "auto":
        return config.num_cpus
    if gpu:
        return 0
    if config.replicas > 1:
        return 1
    import ray
    if ray.is_initialized():
        return int(max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])) or 1
    return os.cpu_count() or 1


def build_app(config: ServeConfig, api_key: Optional[str]):
    """The bound Serve application for a validated serve block; `api_key` None serves without a key (the driver
    reads it: rwkvray/launch/serving.py)."""
    model_file = local_copy(config.model)  # a URI: downloaded into this node's cache (the replicas do the same)
    base = base_fingerprint(model_file)  # refuses a bad model file here, before any replica starts
    dims = load_checkpoint(model_file).dims
    registry = StateRegistry.options(num_replicas=1, max_ongoing_requests=1000,
                                     ray_actor_options={"num_cpus": 0}).bind(
        config.states_dir, dims, config.model_name, int(config.max_upload_mb * 2**20), base)
    gpu = use_gpu(config)
    cpus = replica_cpus(config, gpu)
    model = StateModel.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_batch_size * ENGINE_QUEUE_FACTOR,
        ray_actor_options={"num_cpus": cpus, "num_gpus": 1 if gpu else 0},
    ).bind(config, registry, cpus or None)
    return Gateway.options(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}).bind(
        config, dims.vocab_size, api_key, registry, model)
