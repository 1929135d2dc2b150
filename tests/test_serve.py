"""The Serve endpoint on a REAL local Ray Serve instance (one per module), driven over HTTP."""
import asyncio
import base64
import io
import json
import os
import socket
import time

import httpx
import pytest
import torch

from rwkvray.model.checkpoint import save_checkpoint
from rwkvray.cli import main as rwkvray_main
from rwkvray.spec import spec_from_dict
from rwkvray.text.chat import REPLY_END, render_chat
from rwkvray.model.state_file import save_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.serve.proxy_guard import proxy_env
from tests.test_serve_units import PROMPTS, random_state, reference_text, serve_model, state_bytes

pytestmark = pytest.mark.ray

KEY_ENV = "RWKVRAY_TEST_SERVE_KEY"
KEY = "test-key-123"
BASE = "tiny-rwkv"
MAX_TOKENS_CAP = 32
MAX_PROMPT_TOKENS = 64
LOAD_REQUESTS = 200
LOAD_CONCURRENCY = 24
LOAD_MAX_TOKENS = 8
STATE_SEEDS = {"alpha": 1, "beta": 2, "gamma": 3}  # alpha, beta in states_dir; gamma only ever uploaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, folder, model, config, metrics_url: str):
        self.url = url
        self.folder = folder
        self.model = model
        self.config = config
        self.metrics_url = metrics_url
        self.model_path = str(folder / f"{BASE}.pth")
        self.states_dir = folder / "states"
        self.references: dict = {}

    def client(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def reference(self, prompt: str, name: str, max_tokens: int) -> str:
        """Greedy text as `rwkvray generate` makes it (cached: the reference loop is slow on a busy CPU)."""
        key = (prompt, name, max_tokens)
        if key not in self.references:
            state = None if name == BASE else random_state(STATE_SEEDS[name])
            self.references[key] = reference_text(self.model, prompt, state, max_tokens)
        return self.references[key]

    def chat_reference(self, content: str, name: str, max_tokens: int) -> str:
        prompt = render_chat([{"role": "user", "content": content}], add_generation_prompt=True)
        text = self.reference(prompt, name, max_tokens)
        return text.split(REPLY_END)[0].removeprefix(" ")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve
    from rwkvray.launch.serving import read_api_key, start_serve
    from rwkvray.serve.app import APP_NAME, build_app

    folder = tmp_path_factory.mktemp("serve")
    model = serve_model()
    save_checkpoint(model.state_dict(), str(folder / f"{BASE}.pth"))
    (folder / "states").mkdir()
    for name in ("alpha", "beta"):
        save_state(random_state(STATE_SEEDS[name]), str(folder / "states" / f"{name}.pth"))
    save_state(random_state(9), str(folder / "secret.pth"))  # valid, but outside states_dir
    os.environ[KEY_ENV] = KEY
    guard = proxy_env(KEY_ENV)  # as `rwkvray serve` sets it before Ray starts: Ray's proxy guards /-/routes
    os.environ.update(guard)
    config = spec_from_dict({"serve": {
        "model": str(folder / f"{BASE}.pth"), "states_dir": str(folder / "states"), "api_key_env": KEY_ENV,
        "max_batch_size": 8, "max_mounted_states": 4, "batch_wait_ms": 5.0, "max_tokens_cap": MAX_TOKENS_CAP,
        "default_max_tokens": 16, "max_prompt_tokens": MAX_PROMPT_TOKENS, "max_upload_mb": 0.25,
        "use_gpu": False}}, "test serve spec").serve
    metrics_port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
             log_to_driver=False)  # the replicas' request logs stay in Ray's log files, out of pytest's output
    port = free_port()  # after Ray is up: its processes bind ephemeral ports too
    try:
        start_serve("127.0.0.1", port)
        serve.run(build_app(config, read_api_key(config)), name=APP_NAME, route_prefix="/")
        yield Server(f"http://127.0.0.1:{port}", folder, model, config, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()
        for name in (KEY_ENV, *guard):
            del os.environ[name]


def completion(client: httpx.Client, model: str, prompt: str, **fields) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, **fields})


def upload_json(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/states", json={"name": name, "data": base64.b64encode(data).decode()})


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_openai_client_plain_completion_and_streamed_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    for name in (BASE, "alpha"):
        plain = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0)
        assert plain.choices[0].text == server.reference(PROMPTS[1], name, 8)
        assert plain.usage.completion_tokens == 8 and plain.model == name
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == server.chat_reference("hi", name, 8)
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 8
    assert server.reference(PROMPTS[1], BASE, 8) != server.reference(PROMPTS[1], "alpha", 8)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-state", prompt="hi", max_tokens=2)


def test_greedy_endpoint_equals_rwkvray_generate(server, capsys):
    state_file = str(server.states_dir / "alpha.pth")
    assert rwkvray_main(["generate", "--model", server.model_path, "--state", state_file, "--prompt", PROMPTS[2],
                         "--max-tokens", "12", "--temperature", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    with server.client() as client:
        text = completion(client, "alpha", PROMPTS[2], max_tokens=12, temperature=0).json()["choices"][0]["text"]
    assert text + "\n" == printed


def test_api_key_is_required_everywhere_but_healthz(server):
    routes = [("GET", "/v1/models"), ("GET", "/v1/states"), ("GET", "/v1/stats"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("POST", "/v1/states"), ("DELETE", "/v1/states/alpha")]
    for key in (None, "wrong-key"):
        with server.client(key) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            for method, path in routes:
                response = client.request(method, path, json={"model": BASE, "prompt": "x"})
                assert response.status_code == 401, (key, method, path)
                assert error_of(response)["code"] == "invalid_api_key"
            ray_routes = client.get("/-/routes")  # Ray's proxy answers it, before our app
            assert ray_routes.status_code == 401 and error_of(ray_routes)["code"] == "invalid_api_key"
            for listing in ("/openapi.json", "/docs", "/redoc"):
                assert client.get(listing).status_code == 404, listing
    with server.client() as client:
        assert client.get("/-/routes").json() == {"/": "rwkvray"}
        assert client.get("/openapi.json").status_code == 404  # not served at all


def test_caps_and_bad_requests_are_400_and_unknown_model_404(server):
    with server.client() as client:
        too_many = completion(client, BASE, "hi", max_tokens=MAX_TOKENS_CAP + 1)
        assert too_many.status_code == 400 and error_of(too_many)["param"] == "max_tokens"
        long_prompt = completion(client, BASE, "word " * (MAX_PROMPT_TOKENS + 1))
        assert long_prompt.status_code == 400 and error_of(long_prompt)["code"] == "context_length_exceeded"
        assert completion(client, BASE, "hi", n=2).status_code == 400
        assert client.post("/v1/completions", content=b"{not json").status_code == 400
        unknown = completion(client, "no-such-state", "hi")
        assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"


def test_path_traversal_is_refused(server):
    with server.client() as client:
        for name in ("../secret", "/etc/passwd", "states/../../secret", ".."):
            mount = client.post("/v1/states", json={"name": name})
            assert mount.status_code == 400 and error_of(mount)["code"] == "invalid_state_name", name
            assert upload_json(client, name, state_bytes(random_state(9))).status_code == 400
        assert completion(client, "../secret", "hi").status_code == 400
        assert client.delete("/v1/states/..%2Fsecret").status_code in (400, 404)
        os.symlink(server.folder / "secret.pth", server.states_dir / "sneaky.pth")
        try:
            assert completion(client, "sneaky", "hi").status_code == 400
        finally:
            os.unlink(server.states_dir / "sneaky.pth")
        names = [m["name"] for m in client.get("/v1/states").json()["mounted"]]
        assert "secret" not in names and "sneaky" not in names


def test_bad_uploads_are_refused_and_a_good_multipart_upload_serves(server):
    with server.client() as client:
        garbage = upload_json(client, "junk", b"not a checkpoint")
        assert garbage.status_code == 400 and "not a PyTorch checkpoint" in error_of(garbage)["message"]
        bad_base64 = client.post("/v1/states", json={"name": "junk", "data": "@@@"})
        assert bad_base64.status_code == 400 and error_of(bad_base64)["param"] == "data"
        too_big = upload_json(client, "junk", b"x" * (300 * 1024))
        assert too_big.status_code == 413 and error_of(too_big)["code"] == "upload_too_large"
        buffer = io.BytesIO()
        torch.save({"blocks.0.att.time_state": os.system}, buffer)  # a pickled callable: weights_only refuses
        assert upload_json(client, "junk", buffer.getvalue()).status_code == 400
        assert completion(client, "junk", "hi").status_code == 404

        files = {"file": ("delta.pth", state_bytes(random_state(4)), "application/octet-stream")}
        mounted = client.post("/v1/states", data={"name": "delta"}, files=files)
        assert mounted.json() == {"name": "delta", "source": "upload", "shape": [2, 1, 64, 64], "token_shift": False,
                                  "card": None, "base_match": None,
                                  "warning": "no state card: the base model it was tuned on is unknown"}
        text = completion(client, "delta", PROMPTS[1], max_tokens=6, temperature=0).json()["choices"][0]["text"]
        assert text == reference_text(server.model, PROMPTS[1], random_state(4), 6)


def test_wrong_shape_state_is_400_naming_both_shapes(server):
    with server.client() as client:
        response = upload_json(client, "wide", state_bytes(TunedState(torch.zeros(2, 2, 64, 64))))
        assert response.status_code == 400
        assert "[2, 2, 64, 64]" in error_of(response)["message"]
        assert "[2, 1, 64, 64]" in error_of(response)["message"]
        save_state(TunedState(torch.zeros(3, 1, 64, 64)), str(server.states_dir / "deep.pth"))
        dropped = completion(client, "deep", "hi")
        assert dropped.status_code == 400 and "[3, 1, 64, 64]" in error_of(dropped)["message"]


def test_dropped_in_state_serves_without_restart_and_unmount_is_404_until_remounted(server):
    save_state(random_state(5), str(server.states_dir / "epsilon.pth"))
    with server.client() as client:
        assert "epsilon" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        first = completion(client, "epsilon", PROMPTS[0], max_tokens=6, temperature=0).json()["choices"][0]["text"]
        assert first == reference_text(server.model, PROMPTS[0], random_state(5), 6)
        assert "epsilon" in [m["name"] for m in client.get("/v1/states").json()["mounted"]]
        assert client.delete("/v1/states/epsilon").json() == {"name": "epsilon", "mounted": False}
        gone = completion(client, "epsilon", PROMPTS[0], max_tokens=6, stream=True)
        assert gone.status_code == 404 and "not mounted" in error_of(gone)["message"]
        assert client.get("/v1/states").json()["unmounted"] == ["epsilon"]
        assert client.post("/v1/states", json={"name": "epsilon"}).status_code == 200
        again = completion(client, "epsilon", PROMPTS[0], max_tokens=6, temperature=0).json()["choices"][0]["text"]
        assert again == first


# ---------------------------------------------------------------- load


async def one_request(client: httpx.AsyncClient, name: str, prompt: str, stream: bool) -> tuple[float, int, str]:
    """(start time, status, text) of one greedy completion, streamed or not."""
    started = time.monotonic()
    body = {"model": name, "prompt": prompt, "max_tokens": LOAD_MAX_TOKENS, "temperature": 0, "stream": stream}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else response.text
        return started, response.status_code, text
    async with client.stream("POST", "/v1/completions", json=body) as response:
        raw = (await response.aread()).decode()
    if response.status_code != 200:
        return started, response.status_code, raw
    events = [line[len("data: "):] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return started, 200, "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])


async def load_test(server) -> tuple[list, float, float]:
    """200 bounded-concurrency requests over alpha, beta, gamma; gamma is uploaded after 50 finish and beta
    unmounted after 100 finish. Returns the results and when the upload and the unmount completed."""
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=LOAD_CONCURRENCY)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120, limits=limits) as client:
        for name in ("alpha", "beta"):
            assert (await client.post("/v1/states", json={"name": name})).status_code == 200
        gate, done = asyncio.Semaphore(LOAD_CONCURRENCY), []
        marks = {}

        async def bounded(i: int):
            name, prompt = ("alpha", "beta", "gamma")[i % 3], PROMPTS[(i // 3) % len(PROMPTS)]
            async with gate:
                result = await one_request(client, name, prompt, stream=i % 2 == 0)
            done.append(i)
            return (name, prompt, *result)

        async def operator():
            while len(done) < 50:
                await asyncio.sleep(0.01)
            assert (await client.post("/v1/states", json={
                "name": "gamma", "data": base64.b64encode(state_bytes(random_state(3))).decode()})).status_code == 200
            marks["mounted"] = time.monotonic()
            while len(done) < 100:
                await asyncio.sleep(0.01)
            assert (await client.delete("/v1/states/beta")).status_code == 200
            marks["unmounted"] = time.monotonic()

        results, _ = await asyncio.gather(asyncio.gather(*(bounded(i) for i in range(LOAD_REQUESTS))), operator())
    return results, marks["mounted"], marks["unmounted"]


def test_load_200_requests_mixed_states_with_mount_and_unmount(server):
    for name in STATE_SEEDS:
        for prompt in PROMPTS:
            server.reference(prompt, name, LOAD_MAX_TOKENS)
    started = time.monotonic()
    results, mounted_at, unmounted_at = asyncio.run(load_test(server))
    elapsed = time.monotonic() - started

    assert len(results) == LOAD_REQUESTS
    assert [r for r in results if r[3] >= 500] == []
    for name, prompt, _, status, text in results:
        if status == 200:
            assert text == server.reference(prompt, name, LOAD_MAX_TOKENS), (name, prompt)
        else:
            assert status == 404 and "error" in text, (name, status, text)
    gamma_after = [r for r in results if r[0] == "gamma" and r[2] > mounted_at]
    beta_after = [r for r in results if r[0] == "beta" and r[2] > unmounted_at]
    assert len(gamma_after) >= 20 and all(r[3] == 200 for r in gamma_after)
    assert len(beta_after) >= 20 and all(r[3] == 404 for r in beta_after)
    assert all(r[3] == 200 for r in results if r[0] == "alpha")

    with server.client() as client:
        stats = client.get("/v1/stats").json()
    engine = stats["model_replica"]
    assert engine["max_states_in_step"] > 1 and engine["max_batch_rows"] > 1, stats
    assert engine["generated_tokens"] >= LOAD_MAX_TOKENS * len([r for r in results if r[3] == 200]) // 2
    assert engine["mean_time_to_first_token_s"] > 0 and engine["mean_inter_token_latency_s"] > 0
    print(f"\nload: {LOAD_REQUESTS} requests in {elapsed:.1f}s; stats {stats}")


# ---------------------------------------------------------------- cards, blends, metrics, restart


def test_a_state_card_naming_another_base_is_409_unless_forced(server):
    from rwkvray.model.state_card import base_fingerprint
    ours = base_fingerprint(server.model_path)
    theirs = {**ours, "sha256": "0" * 64, "file": "other-model.pth"}
    save_state(random_state(6), str(server.states_dir / "foreign.pth"))
    (server.states_dir / "foreign.json").write_text(json.dumps({"base": theirs, "method": "state"}))
    with server.client() as client:
        refused = client.post("/v1/states", json={"name": "foreign"})
        assert refused.status_code == 409
        message = error_of(refused)["message"]
        assert "'other-model.pth' (sha256 0000000000000000…)" in message
        assert f"'{BASE}.pth' (sha256 {ours['sha256'][:16]}…)" in message
        assert completion(client, "foreign", "hi").status_code == 409
        forced = client.post("/v1/states", json={"name": "foreign", "force": True}).json()
        assert forced["warning"].startswith("mounted with force")
        card = json.dumps({"base": ours, "method": "state"})
        files = {"file": ("own.pth", state_bytes(random_state(7)), "application/octet-stream")}
        owned = client.post("/v1/states", data={"name": "own", "card": card}, files=files).json()
        assert owned == {"name": "own", "source": "upload", "shape": [2, 1, 64, 64], "token_shift": False,
                         "card": json.loads(card), "base_match": True}  # a matching card: no warning
        unknown = client.post("/v1/states", json={"name": "x", "forse": True})
        assert unknown.status_code == 400 and error_of(unknown)["message"] == (
            "unknown key 'forse' in the /v1/states body (allowed: name, data, card, force, blend, replace)")


def test_blends_mount_as_states_and_record_their_recipe(server):
    with server.client() as client:
        assert client.post("/v1/states", json={"name": "alpha"}).status_code == 200
        assert client.post("/v1/states", json={"name": "beta"}).status_code == 200
        assert client.post("/v1/states", json={"name": "solo", "blend": {"alpha": 1}}).json()["source"] == "blend"
        mix = client.post("/v1/states", json={"name": "mix", "blend": {"alpha": 0.7, "beta": -0.3}})
        assert mix.status_code == 200, mix.text
        text = lambda name: completion(client, name, PROMPTS[0], max_tokens=8, temperature=0).json()["choices"][0]["text"]
        assert text("solo") == server.reference(PROMPTS[0], "alpha", 8)
        assert text("mix") not in (server.reference(PROMPTS[0], "alpha", 8), server.reference(PROMPTS[0], "beta", 8))
        assert text("mix") == reference_text(server.model, PROMPTS[0], TunedState(
            0.7 * random_state(1).time_state - 0.3 * random_state(2).time_state), 8)
        assert json.loads((server.states_dir / "mix.json").read_text())["blend"] == {"alpha": 0.7, "beta": -0.3}
        bad = client.post("/v1/states", json={"name": "bad", "blend": {"alpha": "much"}})
        assert bad.status_code == 400 and error_of(bad)["message"] == "blend weight of 'alpha' must be a number"


def test_metrics_reach_prometheus_and_v1_stats(server):
    names = ["rwkvray_time_to_first_token_s", "rwkvray_inter_token_latency_s", "rwkvray_generated_tokens",
             "rwkvray_batch_rows", "rwkvray_prefill_tokens_per_step", "rwkvray_prefix_cache_misses",
             "rwkvray_mounted_states"]
    with server.client() as client:
        assert completion(client, BASE, PROMPTS[0], max_tokens=4, temperature=0).status_code == 200
        stats = client.get("/v1/stats").json()
    assert stats["mounted_states"] >= 1 and stats["model_replica"]["prefix_cache"]["misses"] >= 1
    assert stats["model_replica"]["op"] == "auto" and stats["model_replica"]["tokens_per_s"] > 0
    assert stats["model_replica"]["torch_threads"] == 2  # serve.num_cpus auto: every CPU of the 2-CPU node
    deadline, missing = time.monotonic() + 60, names
    while missing and time.monotonic() < deadline:
        time.sleep(2)
        scraped = httpx.get(server.metrics_url, timeout=10).text
        missing = [name for name in names if name not in scraped]
    assert missing == []


def test_serve_processes_run_with_the_quieter_background_intervals(server):
    import ray
    from rwkvray.launch.serving import SERVE_ENV
    classes = {"ServeController", "ProxyActor", "ServeReplica:rwkvray:StateModel", "ServeReplica:rwkvray:Gateway"}
    pids = {actor["ActorClassName"]: actor["Pid"] for actor in ray._private.state.actors().values()
            if actor["State"] == "ALIVE" and actor["ActorClassName"] in classes}
    assert set(pids) == classes
    for name, pid in pids.items():
        with open(f"/proc/{pid}/environ") as environ:
            variables = dict(entry.partition("=")[::2] for entry in environ.read().split("\0") if entry)
        assert {key: variables.get(key) for key in SERVE_ENV} == SERVE_ENV, name


def test_serve_env_keeps_a_value_the_user_set(monkeypatch):
    from rwkvray.launch.serving import SERVE_ENV, serve_env
    monkeypatch.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.2")
    assert serve_env() == {**SERVE_ENV, "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.2"}


def test_an_uploaded_state_survives_a_restart(server):
    from ray import serve
    from rwkvray.launch.serving import read_api_key
    from rwkvray.serve.app import APP_NAME, build_app
    with server.client() as client:
        assert upload_json(client, "kept", state_bytes(random_state(8))).status_code == 200
    assert (server.states_dir / "kept.pth").is_file()
    serve.delete(APP_NAME)
    serve.run(build_app(server.config, read_api_key(server.config)), name=APP_NAME, route_prefix="/")
    with server.client() as client:
        text = completion(client, "kept", PROMPTS[1], max_tokens=6, temperature=0).json()["choices"][0]["text"]
    assert text == reference_text(server.model, PROMPTS[1], random_state(8), 6)


def test_uploads_and_blends_never_overwrite_silently(server):
    card = {"method": "state", "note": "first"}
    first, second = state_bytes(random_state(11)), state_bytes(random_state(12))
    with server.client() as client:
        upload = lambda data, **extra: client.post("/v1/states", json={
            "name": "kept1", "data": base64.b64encode(data).decode(), **extra})
        assert upload(first, card=card).status_code == 200
        taken = upload(second)
        assert taken.status_code == 409 and error_of(taken) == {
            "message": "state 'kept1' already exists; send \"replace\": true to replace it (the current one is then "
                       "kept as 'kept1.prev')", "type": "invalid_request_error", "param": "name", "code": "state_exists"}
        assert (server.states_dir / "kept1.pth").read_bytes() == first
        assert json.loads((server.states_dir / "kept1.json").read_text()) == card
        assert upload(second, replace=True).json()["card"] is None
        assert (server.states_dir / "kept1.pth").read_bytes() == second and not (server.states_dir / "kept1.json").exists()
        assert (server.states_dir / "kept1.prev.pth").read_bytes() == first
        assert json.loads((server.states_dir / "kept1.prev.json").read_text()) == card
        text = lambda name: completion(client, name, PROMPTS[0], max_tokens=5, temperature=0).json()["choices"][0]["text"]
        assert text("kept1.prev") == reference_text(server.model, PROMPTS[0], random_state(11), 5)  # servable

        blend = lambda name, weights, **extra: client.post("/v1/states", json={"name": name, "blend": weights, **extra})
        assert blend("kept1", {"alpha": 1.0}).status_code == 409
        itself = blend("kept1", {"kept1": 2.0}, replace=True)
        assert itself.status_code == 400 and error_of(itself)["message"] == (
            "the blend 'kept1' names itself among its states; give the result a new name")
        assert (server.states_dir / "kept1.pth").read_bytes() == second
        assert blend("kept1", {"alpha": 1.0}, replace=True).json()["card"]["blend"] == {"alpha": 1.0}
        assert (server.states_dir / "kept1.prev.pth").read_bytes() == second
        assert not (server.states_dir / "kept1.prev.json").exists()  # the replaced one had no card
        mount = client.post("/v1/states", json={"name": "alpha", "replace": True})
        assert mount.status_code == 400 and error_of(mount)["param"] == "replace"


def test_bad_fields_are_named(server):
    with server.client() as client:
        seed = completion(client, BASE, "hi", seed=2**64)
        assert seed.status_code == 400 and error_of(seed)["message"] == (
            "seed: must be an integer from -9223372036854775808 to 9223372036854775807 (int64)")
        files = {"file": ("x.pth", state_bytes(random_state(4)), "application/octet-stream")}
        card = client.post("/v1/states", data={"name": "carded", "card": "{nope"}, files=files)
        assert card.status_code == 400 and error_of(card)["param"] == "card"
        assert error_of(card)["message"].startswith("the multipart field `card` is not valid JSON (")
        buffer = io.BytesIO()
        torch.save({"blocks.0.att.time_state": os.system}, buffer)
        pickled = upload_json(client, "trap", buffer.getvalue())
        assert error_of(pickled)["message"] == "state 'trap': holds objects other than tensors; it was not loaded"
        save_state(random_state(3), str(server.states_dir / "badcard.pth"))
        (server.states_dir / "badcard.json").write_text("{oops")
        refused = client.post("/v1/states", json={"name": "badcard"})
        message = error_of(refused)["message"]
        assert refused.status_code == 400 and message.startswith("state 'badcard': its card badcard.json is not valid "
                                                                  "JSON (")
        assert str(server.states_dir) not in message
