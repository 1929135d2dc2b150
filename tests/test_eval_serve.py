"""POST /v1/evals on a real local Ray Serve instance: the same results rows as `rwkvray eval` for the same rows and
states, and its limits and bad requests."""
import json
import os
import socket

import httpx
import pytest
import torch

from rwkvray.cli import main
from rwkvray.model.rwkv import load_model
from rwkvray.model.state_file import save_state
from rwkvray.model.tuned_state import TunedState
from rwkvray.spec import spec_from_dict

pytestmark = pytest.mark.ray
QUIZ = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona_quiz.jsonl")
KEY_ENV = "RWKVRAY_TEST_EVAL_KEY"
KEY = "eval-key"
BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(make_tiny_model, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve
    from rwkvray.launch.serving import start_serve
    from rwkvray.serve.app import APP_NAME, build_app
    folder = tmp_path_factory.mktemp("evals")
    model = make_tiny_model(1, 64)
    dims = load_model(model)[0].dims
    (folder / "states").mkdir()
    torch.manual_seed(7)
    for name, scale in (("loud", 2.0), ("quiet", 0.5)):
        save_state(TunedState(scale * torch.randn(1, *dims.state_shape)), str(folder / "states" / f"{name}.pth"))
    os.environ[KEY_ENV] = KEY
    config = spec_from_dict({"serve": {"model": model, "states_dir": str(folder / "states"), "api_key_env": KEY_ENV,
                                       "max_batch_size": BATCH, "max_tokens_cap": 16, "default_max_tokens": 16,
                                       "max_prompt_tokens": 64,
                                       "max_eval_rows": 20, "use_gpu": False,
                                       "num_cpus": 1}}, "test").serve  # `rwkvray eval` runs beside it
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()  # after Ray is up: its processes bind ephemeral ports too
    try:
        start_serve("127.0.0.1", port)
        serve.run(build_app(config, KEY), name=APP_NAME, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=300) as client:
            yield client, model, folder
    finally:
        serve.shutdown()
        ray.shutdown()
        del os.environ[KEY_ENV]


def quiz_rows() -> list[dict]:
    """Three rows of each kind of the bundled quiz (a shorter test)."""
    rows = [json.loads(line) for line in open(QUIZ)]
    return rows[:3] + rows[10:13] + rows[14:17]


def test_v1_evals_equals_the_command(server, tmp_path, capsys):
    client, model, folder = server
    response = client.post("/v1/evals", json={"states": ["loud", "quiet"], "rows": quiz_rows(), "max_tokens": 8,
                                              "data": "persona_quiz.jsonl"})
    assert response.status_code == 200, response.text
    body = response.json()
    out, quiz = tmp_path / "results.json", tmp_path / "persona_quiz.jsonl"
    quiz.write_text("".join(json.dumps(row) + "\n" for row in quiz_rows()))
    assert main(["eval", "--model", model, "--data", str(quiz), "--max-tokens", "8", "--batch-size", str(BATCH),
                 "--state", f"loud={folder / 'states' / 'loud.pth'}", "--state",
                 f"quiet={folder / 'states' / 'quiet.pth'}", "--out", str(out)]) == 0
    capsys.readouterr()
    assert body["results"] == json.loads(out.read_text())["results"]
    assert [(r["state"], r["metric"]) for r in body["results"]][:4] == [
        ("base", "mc_acc"), ("base", "exact"), ("base", "contains"), ("base", "loss")]
    assert {(c["state"], c["metric"]) for c in body["comparisons"]} == {
        (s, m) for s in ("loud", "quiet") for m in ("mc_acc", "exact", "contains", "loss")}
    assert len(body["details"]) == 3 * len(quiz_rows())


@pytest.mark.parametrize("fields, status, param, message", [
    ({"rows": [{"prompt": "Q", "choices": ["a", "b"], "answer": 5}]}, 400, "rows",
     'rows[0]: "answer" must be an index into choices, 0 to 1 (got 5)'),
    ({"rows": [{"text": "a b c"}] * 21}, 400, "rows", "21 rows, more than this server's limit of 20"),
    ({"rows": [{"text": "word " * 70}]}, 400, "rows", "rows[0] has 71 tokens, more than this server's limit of 64"),
    ({"rows": [{"text": "a b c"}], "max_tokens": 17}, 400, "max_tokens",
     "max_tokens is 17, more than this server's limit of 16"),
    ({"rows": [{"text": "a b c"}], "states": ["base"]}, 400, "states",
     "'base' is the base model, always scored: leave it out of states"),
    ({"rows": [{"text": "a b c"}], "states": ["nobody"]}, 404, "model", "nobody"),
    ({"rows": [], "states": []}, 400, "rows", "rows must be a non-empty list of eval rows"),
    ({"rows": [{"text": "a b c"}], "limit": 3}, 400, "limit", "unknown field 'limit'"),
])
def test_bad_eval_requests(server, fields, status, param, message):
    client = server[0]
    response = client.post("/v1/evals", json=fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param


def test_v1_evals_needs_the_key(server):
    client = server[0]
    response = client.post("/v1/evals", json={"rows": [{"text": "a b c"}]}, headers={"Authorization": "Bearer no"})
    assert response.status_code == 401
