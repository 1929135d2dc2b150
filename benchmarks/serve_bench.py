"""Benchmark the Serve endpoint from a client on loopback, through the real HTTP API.

Workloads (every reply is `--max-tokens` long, greedy):
- batch scaling: 1, 8 and 32 concurrent requests, spread over 8 different states; total tokens/s (one stream:
  three requests one after another, see `waves`);
- long-prompt stall: one request with a `--long-tokens` prompt, then 4 short requests `--stall-delay` s later;
  the short requests' time to first token against the long request's total time;
- prefix reuse: two requests sharing a `--long-tokens` prefix, one after the other; the second's time to
  first token against the first's;
- mounting: POST /v1/states by name, a base64 upload, and the first request after a mount.
Batch scaling runs twice: plain requests, then streamed ones (`"stream": true`, one SSE event per chunk).

    python benchmarks/serve_bench.py                                  # tiny random model, local Serve app
    python benchmarks/serve_bench.py --n-layer 12 --n-embd 768 --json benchmarks/results/serve-0.19b-cpu.json
    python benchmarks/serve_bench.py --n-layer 12 --n-embd 768 --peer rwkvserve   # and the peer, side by side
    python benchmarks/serve_bench.py --n-layer 12 --n-embd 768 --peer rwkvserve --rounds 2   # taking turns
    python benchmarks/serve_bench.py --url http://host:8000 --model BASE --states s1,...,s8 [--api-key KEY]

`--peer rwkvserve` installs rwkvserve 0.1.0 into a venv of its own (once, in rwkvray's cache), converts the
benchmark checkpoint to its model folder (benchmarks/serve_peer.py) and, after rwkvray's app has been measured
and stopped, runs the same workloads against it (its base model: it has no states, so no mounting), then the
ratios. The peer runs as the issue measured it: CPU, fp32, `--max-batch-size 8`, torch's default threads.
`--rounds 2` measures rwkvray, the peer, rwkvray, the peer and reports each side's means: on a shared host whose
speed drifts by 10-40% within minutes, one turn each favours whichever side ran in the faster minutes.

Prints a table, then writes the figures as JSON (default: benchmarks/results/serve-<date>.json).
"""
import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from typing import AsyncIterator

import httpx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rwkvray.files.atomic import write_bytes_atomically  # noqa: E402
from serve_peer import PEER, PEER_REPLY_TOKENS, PEER_VERSION, PeerServer, convert_checkpoint, peer_venv  # noqa: E402

SHORT_PROMPT = "User: Tell me a long story about a lighthouse keeper.\n\nAssistant:"
STATES = 8
BATCHES = (1, 8, 32)
STALL_SHORT_REQUESTS = 4
CEILING_STEPS = 20  # bare steps timed per batch size (5 swung by 10% on a shared host)
MEASURED_REQUESTS = 3  # a batch size is timed over at least this many requests (one reply alone swung by 20%)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; without it, a local Serve app is started")
    parser.add_argument("--model", help="with --url: the base model's name")
    parser.add_argument("--states", help=f"with --url: {STATES} comma-separated state names known to the server")
    parser.add_argument("--api-key", default=os.environ.get("RWKVRAY_API_KEY"))
    parser.add_argument("--n-layer", type=int, default=4, help="local app: layers of the random model")
    parser.add_argument("--n-embd", type=int, default=256, help="local app: width of the random model")
    parser.add_argument("--max-tokens", type=int, help=f"reply length of every request (default: 64; with --peer "
                        f"{PEER_REPLY_TOKENS}, the only length the peer's /v1/completions generates)")
    parser.add_argument("--long-tokens", type=int, default=1500, help="prompt length of the long requests")
    parser.add_argument("--stall-delay", type=float, default=0.3, help="seconds between the long and short requests")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="local app: serve.prefill_chunk")
    parser.add_argument("--stream-interval-ms", type=float, help="local app: serve.stream_interval_ms (default: the spec's)")
    parser.add_argument("--stream-chunks-per-s", type=float,
                        help="local app: serve.stream_chunks_per_s (default: the spec's)")
    parser.add_argument("--num-cpus", type=int, help="local app: serve.num_cpus, the model replica's CPUs and torch "
                        "threads (default: the spec's, auto)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="concurrency levels to measure")
    parser.add_argument("--peer", choices=[PEER], help="local app: also measure this peer server on the same model")
    parser.add_argument("--rounds", type=int, default=1, help="local app: measure each server this many times, "
                        "taking turns with the peer, and report the means (every round is kept in the JSON)")
    parser.add_argument("--json", help="where to write the results (default: benchmarks/results/serve-<date>.json)")
    args = parser.parse_args()
    if args.peer and args.max_tokens not in (None, PEER_REPLY_TOKENS):
        parser.error(f"--peer {PEER}: its /v1/completions ignores max_tokens and always generates "
                     f"{PEER_REPLY_TOKENS} tokens, so --max-tokens must be {PEER_REPLY_TOKENS} for equal replies")
    args.max_tokens = args.max_tokens or (PEER_REPLY_TOKENS if args.peer else 64)
    return args


# ---------------------------------------------------------------- a local app on a random model


def random_checkpoint(n_layer: int, n_embd: int, path: str) -> None:
    """Random weights of the real vocab size, so prompts tokenize and every path of the model does work."""
    from rwkvray.model.checkpoint import save_checkpoint
    from rwkvray.model.init import default_dims, init_weights
    generator = torch.Generator().manual_seed(0)
    weights = init_weights(default_dims(n_layer, n_embd), seed=0)
    for key, tensor in weights.items():
        if tensor.dim() >= 2 and not key.endswith("r_k"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * tensor.shape[-1] ** -0.5)
    save_checkpoint(weights, path)


def start_local_app(args, folder: str, model_path: str) -> tuple[str, str, list[str], int]:
    """(url, base name, state names, the model replica's CPUs) of a fresh local Ray Serve app."""
    import ray
    from ray import serve
    from rwkvray.spec import spec_from_dict
    from rwkvray.launch.serving import read_api_key, start_serve
    from rwkvray.serve.app import APP_NAME, build_app, replica_cpus, use_gpu
    from rwkvray.model.state_file import save_state
    from rwkvray.model.tuned_state import TunedState

    states_dir = os.path.join(folder, "states")
    names = [f"state{i}" for i in range(STATES)]
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(100 + i)
        save_state(TunedState(torch.randn(args.n_layer, args.n_embd // 64, 64, 64, generator=generator)),
                   os.path.join(states_dir, f"{name}.pth"))
    overrides = {"stream_interval_ms": args.stream_interval_ms, "stream_chunks_per_s": args.stream_chunks_per_s,
                 "num_cpus": args.num_cpus}
    config = spec_from_dict({"serve": {
        "model": model_path, "states_dir": states_dir, "max_batch_size": max(BATCHES),
        "max_mounted_states": STATES + 2, "max_tokens_cap": args.max_tokens, "default_max_tokens": args.max_tokens,
        "max_prompt_tokens": args.long_tokens + 256, "prefill_chunk": args.prefill_chunk, "batch_wait_ms": 5.0,
        "use_gpu": "auto", **{key: value for key, value in overrides.items() if value is not None}}},
        "serve_bench").serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    start_serve("127.0.0.1", port)
    serve.run(build_app(config, read_api_key(config)), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}", config.model_name, names, replica_cpus(config, use_gpu(config))


def model_step_ceiling(model_path: str, batches: list[int], threads: int) -> dict:
    """Tokens/s of bare `model.step` at each batch size with the model replica's torch threads: the most the
    engine could reach on this machine."""
    from rwkvray.model.rwkv import RNNState, load_model
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model, _ = load_model(model_path)
    out = {}
    with torch.inference_mode():  # as the engine steps
        for batch in batches:
            state, tokens = RNNState.zeros(model.dims, batch), torch.zeros(batch, dtype=torch.long)
            model.step(tokens, state)
            start = time.perf_counter()
            for _ in range(CEILING_STEPS):
                model.step(tokens, state)
            elapsed = time.perf_counter() - start
            out[str(batch)] = {"threads": threads, "step_ms": elapsed / CEILING_STEPS * 1000,
                               "tokens_per_s": CEILING_STEPS * batch / elapsed}
    torch.set_num_threads(before)
    return out


def prefill_ceiling(model_path: str, tokens: int, chunks: list[int], threads: int) -> dict:
    """Seconds of bare chunked prefill of a `tokens`-token prompt (model.hidden chunk by chunk, then the head
    on the last token) for each chunk size, with the model replica's torch threads."""
    from rwkvray.model.rwkv import load_model
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model, _ = load_model(model_path)
    prompt = torch.randint(model.dims.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.inference_mode():  # as the engine steps
        for chunk in chunks:
            start, state = time.perf_counter(), None
            for at in range(0, tokens, chunk):
                hidden, state = model.hidden(prompt[:, at:at + chunk], state)
            model.head(hidden[:, -1])
            out[str(chunk)] = {"threads": threads, "seconds": time.perf_counter() - start}
    torch.set_num_threads(before)
    return out


def long_text(tokens: int, seed: int) -> str:
    """About `tokens` tokens of varied prose (different seeds give different texts from the first token)."""
    from rwkvray.text.tokenizer import get_tokenizer
    words = ["keeper", "lamp", "storm", "harbour", "gull", "rope", "tide", "night", "stone", "ship", "light",
             "wind", "salt", "bell", "rock", "wave"]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(words), (tokens * 2,), generator=generator).tolist()
    text = f"Story {seed}: " + " ".join(words[i] for i in picks)
    tokenizer = get_tokenizer()
    return tokenizer.decode(tokenizer.encode(text)[:tokens - 2]) + "\n\n"


# ---------------------------------------------------------------- measurements


async def stream_events(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON events of a streamed reply as they arrive: SSE `data: ...` lines, or (rwkvserve 0.1.0's
    /v1/completions) JSON objects one after another with nothing between them."""
    decoder, buffer = json.JSONDecoder(), ""
    async for text in response.aiter_text():
        buffer += text
        while True:
            buffer = buffer.lstrip()
            if buffer.startswith("data:"):
                line, newline, rest = buffer.partition("\n")
                if not newline:
                    break
                buffer, payload = rest, line[len("data:"):].strip()
                if payload and payload != "[DONE]":
                    yield json.loads(payload)
                continue
            try:
                event, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                break  # an object still arriving
            buffer = buffer[end:]
            yield event


async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: seconds to the first token and to the end, tokens generated."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage, text_events, text = None, None, 0, ""
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for event in stream_events(response):
            piece = "".join(choice.get("text") or "" for choice in event.get("choices") or [])
            if piece:
                first = first or time.perf_counter() - start
                text_events += 1
                text += piece
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    # a server without usage in its stream (the peer) sends one event per token
    return {"ttft_s": first, "total_s": time.perf_counter() - start,
            "tokens": text_events if usage is None else usage, "events": text_events, "text": text}


async def complete_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> int:
    """One plain (not streamed) greedy completion; the tokens generated."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def waves(batch: int) -> int:
    """How many waves of `batch` requests one batch size is timed over: at least MEASURED_REQUESTS requests."""
    return max(1, -(-MEASURED_REQUESTS // batch))


async def plain_wave(client, names: list[str], batch: int, max_tokens: int) -> dict:
    tokens = await asyncio.gather(*(complete_one(client, names[i % len(names)], SHORT_PROMPT, max_tokens)
                                    for i in range(batch)))
    return {"tokens": sum(tokens)}


async def streamed_wave(client, names: list[str], batch: int, max_tokens: int) -> dict:
    """Also the decode part: the tokens after each stream's first one, over the time from the earliest first
    token to the last reply's end (what a bare batch step compares with: no prompt, no first-token wait)."""
    replies = await asyncio.gather(*(stream_one(client, names[i % len(names)], SHORT_PROMPT, max_tokens)
                                     for i in range(batch)))
    return {"tokens": sum(r["tokens"] for r in replies), "decode_tokens": sum(r["tokens"] - 1 for r in replies),
            "decode_seconds": max(r["total_s"] for r in replies) - min(r["ttft_s"] for r in replies)}


async def batch_scaling(client, names: list[str], batches: list[int], max_tokens: int, stream: bool = False) -> dict:
    """`batch` requests at once, each to one of `names` in turn, in waves (see `waves`); plain or streamed."""
    wave = streamed_wave if stream else plain_wave
    out = {}
    for batch in batches:
        start, count = time.perf_counter(), waves(batch)
        measured = [await wave(client, names, batch, max_tokens) for _ in range(count)]
        elapsed = time.perf_counter() - start
        totals = {key: sum(m[key] for m in measured) for key in measured[0]}
        out[str(batch)] = {"requests": batch * count, "waves": count, "tokens": totals["tokens"], "seconds": elapsed,
                           "tokens_per_s": totals["tokens"] / elapsed}
        if stream:
            out[str(batch)]["decode_tokens_per_s"] = totals["decode_tokens"] / totals["decode_seconds"]
    if "1" in out and "8" in out:
        out["eight_over_one"] = out["8"]["tokens_per_s"] / out["1"]["tokens_per_s"]
    return out


async def long_prompt_stall(client, base: str, args) -> dict:
    long_request = asyncio.ensure_future(stream_one(client, base, long_text(args.long_tokens, 1), args.max_tokens))
    await asyncio.sleep(args.stall_delay)
    shorts = await asyncio.gather(*(stream_one(client, base, SHORT_PROMPT, args.max_tokens)
                                    for _ in range(STALL_SHORT_REQUESTS)))
    long_result = await long_request
    worst = max(r["ttft_s"] for r in shorts)
    return {"long": long_result, "short_ttft_s": [r["ttft_s"] for r in shorts],
            "worst_short_ttft_over_long_total": worst / long_result["total_s"]}


async def prefix_reuse(client, base: str, args) -> dict:
    prefix = long_text(args.long_tokens, 2)
    first = await stream_one(client, base, prefix + "Question one: who is the keeper?", args.max_tokens)
    second = await stream_one(client, base, prefix + "Question two: what is the storm?", args.max_tokens)
    return {"first": first, "second": second, "second_ttft_over_first": second["ttft_s"] / first["ttft_s"]}


async def timed_ms(call) -> float:
    start = time.perf_counter()
    (await call).raise_for_status()
    return (time.perf_counter() - start) * 1000


async def mount_latency(client: httpx.AsyncClient, names: list[str]) -> dict:
    by_name, first_use, shape = [], [], None
    one_token = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
    for name in names:
        start = time.perf_counter()
        response = await client.post("/v1/states", json={"name": name})
        response.raise_for_status()
        by_name.append((time.perf_counter() - start) * 1000)
        shape = response.json()["shape"]
        first_use.append(await timed_ms(client.post("/v1/completions", json={"model": name, **one_token})))
    buffer = io.BytesIO()
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(shape[1:]) for i in range(shape[0])}, buffer)
    upload = {"name": "bench-upload", "data": base64.b64encode(buffer.getvalue()).decode()}
    return {"mount_by_name_ms": statistics.median(by_name), "first_request_after_mount_ms": statistics.median(first_use),
            "upload_ms": await timed_ms(client.post("/v1/states", json=upload))}


async def run_bench(url: str, base: str, names: list[str], args, states: bool = True) -> dict:
    """Every workload against one server; `states` False (the peer) sends every request to the base model."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    batches = [int(b) for b in args.batches.split(",")]
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600,
                                 limits=httpx.Limits(max_connections=max(batches) + 8)) as client:
        result = {"mount": await mount_latency(client, names)} if states else {}
        targets = names if states else [base]
        await batch_scaling(client, targets, [max(batches)], 4)  # warm-up: every state cached, code paths hot
        result["batch_scaling"] = await batch_scaling(client, targets, batches, args.max_tokens)
        result["streamed_batch_scaling"] = await batch_scaling(client, targets, batches, args.max_tokens, True)
        result["long_prompt_stall"] = await long_prompt_stall(client, base, args)
        result["prefix_reuse"] = await prefix_reuse(client, base, args)
        result["greedy_text"] = (await stream_one(client, base, SHORT_PROMPT, args.max_tokens))["text"]
        stats = await client.get("/v1/stats")
        result["server_stats"] = stats.json() if stats.status_code == 200 else None
    return result


def bench_peer(args, folder: str, model_path: str) -> dict:
    """The same workloads against the peer on the same weights (rwkvray's app is stopped by then)."""
    venv = peer_venv()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = PeerServer(venv, convert_checkpoint(model_path, venv, os.path.join(folder, PEER)), port,
                        max_batch_size=8, log_path=os.path.join(tempfile.gettempdir(), f"{PEER}-{port}.log"))
    try:
        server.wait_ready()
        result = asyncio.run(run_bench(server.url, "bench", [], args, states=False))
    finally:
        server.stop()
    return {"name": PEER, "version": PEER_VERSION, "settings": "--device cpu --dtype fp32 --max-batch-size 8",
            **result}


def versus_peer(ours: dict, peer: dict) -> dict:
    """How far rwkvray is ahead on each row (> 1: ahead): throughput ours/theirs, latency theirs/ours."""
    def streamed(side, batch):
        return side["streamed_batch_scaling"][batch]["tokens_per_s"]

    def worst_short(side):
        return max(side["long_prompt_stall"]["short_ttft_s"])

    ratios = {f"streams_{b}_tokens_per_s": streamed(ours, b) / streamed(peer, b)
              for b in ours["streamed_batch_scaling"] if b in peer["streamed_batch_scaling"] and b.isdigit()}
    ratios.update({
        "long_prompt_first_token": peer["prefix_reuse"]["first"]["ttft_s"] / ours["prefix_reuse"]["first"]["ttft_s"],
        "short_first_token_during_long_prefill": worst_short(peer) / worst_short(ours),
        "shared_prefix_second_first_token": peer["prefix_reuse"]["second"]["ttft_s"]
        / ours["prefix_reuse"]["second"]["ttft_s"]})
    return ratios


def print_table(result: dict) -> None:
    rows = []
    if "mount" in result:
        rows.append(("mount by name / upload / first request after mount",
                     "{mount_by_name_ms:.0f} / {upload_ms:.0f} / {first_request_after_mount_ms:.0f} ms".format(
                         **result["mount"])))
    for kind, label in (("batch_scaling", "plain"), ("streamed_batch_scaling", "streamed")):
        for key, row in result[kind].items():
            if isinstance(row, dict):
                rows.append((f"{key} concurrent {label} request(s)",
                             f"{row['tokens_per_s']:.1f} tok/s total ({row['tokens']} tok in {row['seconds']:.1f} s)"))
    for key, row in result.get("model_step_ceiling", {}).items():
        rows.append((f"ceiling: bare model.step, batch {key}, {row['threads']} thread(s)",
                     f"{row['tokens_per_s']:.1f} tok/s ({row['step_ms']:.0f} ms/step)"))
    ceiling, streamed = result.get("model_step_ceiling", {}), result["streamed_batch_scaling"]
    if "8" in ceiling and "8" in streamed:
        rows.append(("8 streams / bare batch-8 step (goal >= 90%)",
                     f"{100 * streamed['8']['tokens_per_s'] / ceiling['8']['tokens_per_s']:.0f}%"))
        rows.append(("8 streams' decode (after the first tokens) / bare batch-8 step",
                     f"{100 * streamed['8']['decode_tokens_per_s'] / ceiling['8']['tokens_per_s']:.0f}% "
                     f"({streamed['8']['decode_tokens_per_s']:.1f} tok/s)"))
    if "eight_over_one" in result["batch_scaling"]:
        rows.append(("8 concurrent / 1 (goal >= 6x)", f"{result['batch_scaling']['eight_over_one']:.2f}x"))
    stall = result["long_prompt_stall"]
    rows.append(("long-prompt stall: worst short TTFT / long total (goal <= 25%)",
                 f"{100 * stall['worst_short_ttft_over_long_total']:.0f}% "
                 f"({max(stall['short_ttft_s']):.2f} s / {stall['long']['total_s']:.2f} s)"))
    reuse = result["prefix_reuse"]
    rows.append(("prefix reuse: 2nd TTFT / 1st TTFT (goal <= 20%)",
                 f"{100 * reuse['second_ttft_over_first']:.0f}% "
                 f"({reuse['second']['ttft_s']:.2f} s / {reuse['first']['ttft_s']:.2f} s)"))
    rows.append(("first token of the long prompt", f"{reuse['first']['ttft_s']:.2f} s"))
    for key, row in result.get("prefill_ceiling", {}).items():
        rows.append((f"ceiling: bare prefill of the long prompt, chunks of {key}, {row['threads']} thread(s)",
                     f"{row['seconds']:.2f} s"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def print_versus(ratios: dict) -> None:
    print(f"rwkvray ahead of {PEER} {PEER_VERSION} by (> 1: ahead):")
    for key, value in ratios.items():
        print(f"  {key:<40}  {value if isinstance(value, bool) else f'{value:.2f}x'}")


def bench_local(args, folder: str, model_path: str) -> dict:
    """Every workload against a fresh local app (its own states folder), stopped afterwards, then the bare
    ceilings."""
    url, base, names, threads = start_local_app(args, tempfile.mkdtemp(dir=folder), model_path)
    try:
        result = asyncio.run(run_bench(url, base, names, args))
    finally:
        import ray
        from ray import serve
        serve.shutdown()
        ray.shutdown()
    batches = [int(b) for b in args.batches.split(",")]
    result["model_step_ceiling"] = model_step_ceiling(model_path, batches, threads)
    result["prefill_ceiling"] = prefill_ceiling(model_path, args.long_tokens, sorted({args.prefill_chunk, 512}),
                                                threads)
    return result


def mean_result(rounds: list):
    """The rounds' results as one: numbers (and lists of them) averaged, anything else from the first round."""
    first = rounds[0]
    if isinstance(first, dict):
        return {key: mean_result([r[key] for r in rounds]) for key in first}
    if isinstance(first, list) and all(isinstance(v, (int, float)) for v in first):
        return [statistics.mean(values) for values in zip(*rounds)]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and None not in rounds:
        return statistics.mean(rounds)
    return first


def main() -> None:
    args = parse_args()
    if args.url:
        names = (args.states or "").split(",")
        if not args.model or len(names) < STATES:
            raise SystemExit(f"--url needs --model and --states with {STATES} names")
        result = asyncio.run(run_bench(args.url, args.model, names, args))
        result["server"] = args.url
    else:
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as folder:
            model_path = os.path.join(folder, "bench-model.pth")
            random_checkpoint(args.n_layer, args.n_embd, model_path)
            ours, theirs = [], []
            for _ in range(args.rounds):  # with the peer: ours, theirs, ours, ... so a drifting host hits both
                ours.append(bench_local(args, folder, model_path))
                if args.peer:
                    theirs.append(bench_peer(args, folder, model_path))
            result = mean_result(ours)
            if args.peer:
                result["peer"] = mean_result(theirs)
                result["versus_peer"] = versus_peer(result, result["peer"])
                result["versus_peer"]["same_greedy_text"] = len({r["greedy_text"] for r in ours + theirs}) == 1
            if args.rounds > 1:
                result["rounds"] = {"rwkvray": ours, **({"peer": theirs} if args.peer else {})}
        result["model"] = {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab": 65536, "dtype": "fp32 on CPU, "
                           "bf16 on GPU", "weights": "random"}
    result["settings"] = {k: getattr(args, k) for k in ("max_tokens", "long_tokens", "stall_delay", "prefill_chunk", "num_cpus",
                                                          "rounds")}
    result["host"] = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                      "load_average_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["command"] = " ".join(["python", *sys.argv])
    print_table(result)
    if "peer" in result:
        print(f"\n{PEER} {PEER_VERSION}:")
        print_table(result["peer"])
        print_versus(result["versus_peer"])
    path = args.json or os.path.join(ROOT, "benchmarks", "results", f"serve-{time.strftime('%Y-%m-%d')}.json")
    write_bytes_atomically(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
