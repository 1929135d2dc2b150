"""Benchmark the Serve endpoint from a client on loopback: state mount latency, and decode throughput of a
batch of 8 requests on ONE state versus 8 requests on 8 DIFFERENT states (mixed-state batching should make
the second nearly as fast as the first).

    python benchmarks/serve_bench.py                      # starts its own local Serve app on a tiny model
    python benchmarks/serve_bench.py --url http://host:8000 --model BASE --states s1,...,s8 [--api-key KEY]

Prints a table, then the same figures as one JSON line.
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
import tempfile
import time

import httpx
import torch

PROMPT = "User: Tell me a long story about a lighthouse keeper.\n\nAssistant:"
BATCH = 8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; without it, a local Serve app is started")
    parser.add_argument("--model", help="with --url: the base model's name")
    parser.add_argument("--states", help=f"with --url: {BATCH} comma-separated state names known to the server")
    parser.add_argument("--api-key", default=os.environ.get("RWKVRAY_API_KEY"))
    parser.add_argument("--n-layer", type=int, default=4, help="local app: layers of the random model")
    parser.add_argument("--n-embd", type=int, default=256, help="local app: width of the random model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (best is kept)")
    return parser.parse_args()


# ---------------------------------------------------------------- a local app on a random model


def random_checkpoint(n_layer: int, n_embd: int, path: str) -> None:
    """Random weights of the real vocab size, so prompts tokenize and every path of the model does work."""
    from rwkvray.checkpoint import save_checkpoint
    from rwkvray.init_model import default_dims, init_weights
    generator = torch.Generator().manual_seed(0)
    weights = init_weights(default_dims(n_layer, n_embd), seed=0)
    for key, tensor in weights.items():
        if tensor.dim() >= 2 and not key.endswith("r_k"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * tensor.shape[-1] ** -0.5)
    save_checkpoint(weights, path)


def start_local_app(args, folder: str) -> tuple[str, str, list[str], str]:
    """(url, base name, state names, api key) of a fresh local Ray Serve app."""
    import ray
    from ray import serve
    from rwkvray.config import spec_from_dict
    from rwkvray.serve.app import APP_NAME, build_app
    from rwkvray.state_file import save_state

    model_path = os.path.join(folder, "bench-model.pth")
    random_checkpoint(args.n_layer, args.n_embd, model_path)
    states_dir = os.path.join(folder, "states")
    names = [f"state{i}" for i in range(BATCH)]
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(100 + i)
        save_state(torch.randn(args.n_layer, args.n_embd // 64, 64, 64, generator=generator),
                   os.path.join(states_dir, f"{name}.pth"))
    config = spec_from_dict({"serve": {"model": model_path, "states_dir": states_dir, "max_batch_size": BATCH,
                                       "max_mounted_states": BATCH + 2, "max_tokens_cap": args.max_tokens,
                                       "default_max_tokens": args.max_tokens}}, "serve_bench").serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}", config.model_name, names, None


async def engine_stats() -> dict:
    """Counters of the (single) model replica, to show that the 8-state batch really decoded mixed."""
    from ray import serve
    from rwkvray.serve.app import APP_NAME
    return await serve.get_deployment_handle("StateModel", APP_NAME).stats.remote()


# ---------------------------------------------------------------- measurements


def state_upload_body(shape: list[int]) -> dict:
    buffer = io.BytesIO()
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(shape[1:]) for i in range(shape[0])}, buffer)
    return {"name": "bench-upload", "data": base64.b64encode(buffer.getvalue()).decode()}


async def timed(call) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = await call
    response.raise_for_status()
    return (time.perf_counter() - start) * 1000, response


async def mount_latency(client: httpx.AsyncClient, names: list[str]) -> dict:
    """POST /v1/states by name (reads the file), a base64 upload, and the first request after a mount."""
    by_name, first_use, warm_use, shape = [], [], [], None
    one_token = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
    for name in names:
        ms, response = await timed(client.post("/v1/states", json={"name": name}))
        by_name.append(ms)
        shape = response.json()["shape"]
        first_use.append((await timed(client.post("/v1/completions", json={"model": name, **one_token})))[0])
        warm_use.append((await timed(client.post("/v1/completions", json={"model": name, **one_token})))[0])
    upload = [(await timed(client.post("/v1/states", json=state_upload_body(shape))))[0] for _ in range(3)]
    return {"mount_by_name_ms": statistics.median(by_name), "upload_ms": statistics.median(upload),
            "first_request_after_mount_ms": statistics.median(first_use),
            "warm_request_ms": statistics.median(warm_use)}


async def batch_throughput(client: httpx.AsyncClient, models: list[str], max_tokens: int) -> dict:
    """Send one request per model at once; tokens/s over the whole batch, end to end."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    responses = await asyncio.gather(*(client.post("/v1/completions", json={"model": m, **body}) for m in models))
    elapsed = time.perf_counter() - start
    for response in responses:
        response.raise_for_status()
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


async def run_bench(url: str, base: str, names: list[str], api_key: str | None, args, local: bool) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        mount = await mount_latency(client, names)
        configs = {"one_state": [names[0]] * BATCH, "eight_states": names[:BATCH]}
        await batch_throughput(client, configs["eight_states"], 4)  # warm-up: every state cached, code paths hot
        rounds = {key: [] for key in configs}
        for _ in range(args.repeats):
            for key, models in configs.items():  # interleaved, so drift hits both alike
                before = await engine_stats() if local else None
                result = await batch_throughput(client, models, args.max_tokens)
                if local:
                    after = await engine_stats()
                    result["mixed_steps"] = after["mixed_steps"] - before["mixed_steps"]
                    result["steps"] = after["steps"] - before["steps"]
                rounds[key].append(result)
    best = {key: max(results, key=lambda r: r["tokens_per_s"]) for key, results in rounds.items()}
    ratio = best["eight_states"]["tokens_per_s"] / best["one_state"]["tokens_per_s"]
    return {"url": url, "base": base, "max_tokens": args.max_tokens, "batch": BATCH, "mount": mount,
            "decode": best, "eight_over_one": ratio}


def print_table(result: dict) -> None:
    mount, decode = result["mount"], result["decode"]
    rows = [("mount by name (POST /v1/states)", f"{mount['mount_by_name_ms']:.1f} ms"),
            ("upload (base64, POST /v1/states)", f"{mount['upload_ms']:.1f} ms"),
            ("first request after mount (1 token)", f"{mount['first_request_after_mount_ms']:.1f} ms"),
            ("warm request (1 token)", f"{mount['warm_request_ms']:.1f} ms")]
    for key, label in (("one_state", "8 requests, 1 state"), ("eight_states", "8 requests, 8 states")):
        d = decode[key]
        mixed = f", {d['mixed_steps']}/{d['steps']} steps mixed" if "steps" in d else ""
        detail = f"{d['tokens']} tok in {d['seconds']:.2f} s{mixed}"
        rows.append((f"decode, {label}", f"{d['tokens_per_s']:.1f} tok/s ({detail})"))
    rows.append(("8 states / 1 state", f"{result['eight_over_one']:.2f}x"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def main() -> None:
    args = parse_args()
    if args.url:
        names = (args.states or "").split(",")
        if not args.model or len(names) < BATCH:
            raise SystemExit(f"--url needs --model and --states with {BATCH} names")
        result = asyncio.run(run_bench(args.url, args.model, names, args.api_key, args, local=False))
        result["device"] = "remote server"
    else:
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as folder:
            url, base, names, key = start_local_app(args, folder)
            try:
                result = asyncio.run(run_bench(url, base, names, key, args, local=True))
                result["device"] = asyncio.run(engine_stats())["device"]
            finally:
                from ray import serve
                import ray
                serve.shutdown()
                ray.shutdown()
        result["model"] = {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab": 65536}
    result["host"] = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
