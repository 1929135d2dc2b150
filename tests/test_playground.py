"""The state playground page in a real headless Chromium (Debian's `chromium`, driven by Playwright, which never
downloads a browser here) against a real local Serve app over HTTP. Tests run in order on one page."""
import base64
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import httpx
import pytest
import torch

from rwkvray.spec import spec_from_dict
from rwkvray.model.state_file import save_state
from rwkvray.model.tuned_state import TunedState

pytestmark = pytest.mark.ray

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY_ENV = "RWKVRAY_TEST_PLAYGROUND_KEY"
KEY = "playground-key-42"
BASE = "tiny-base"
PROMPT = "Tell me about the sea."
FOLLOW_UP = "And the sky?"
MAX_TOKENS = 12
STATE_SCALE = 20.0  # large enough that each random state visibly changes the greedy text
STATE_SEEDS = {"alpha": 1, "beta": 2, "gamma": 3, "delta": 4}  # alpha, beta in states_dir; the others uploaded
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "playground.png"
UPDATE_SCREENSHOT_ENV = "RWKVRAY_UPDATE_SCREENSHOT"  # =1 also writes docs/playground.png for the README
WAIT_MS = 120_000  # streamed replies on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_state(seed: int, n_layer: int, n_head: int, head_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return STATE_SCALE * torch.randn(n_layer, n_head, head_size, head_size, generator=generator)


def write_card(path: Path, model_path: Path) -> None:
    """A state card in the agreed format (see rwkvray/model/state_card.py once it exists), for the right base."""
    base = {"sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(), "file": model_path.name,
            "version": "x070", "n_layer": 2, "n_embd": 64, "head_size": 64, "vocab_size": 65536}
    card = {"base": base, "method": "state", "data": {"file": "train.jsonl", "size": 1234}, "steps": 40,
            "loss": 1.23456, "val_loss": None, "rwkvray_version": "0.1.0"}
    path.write_text(json.dumps(card))


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny_model):
    ray = pytest.importorskip("ray")
    from ray import serve
    from rwkvray.launch.serving import read_api_key, start_serve
    from rwkvray.serve.app import APP_NAME, build_app

    folder = tmp_path_factory.mktemp("playground")
    model_path = folder / f"{BASE}.pth"
    shutil.copy(make_tiny_model(2, 64), model_path)
    states_dir = folder / "states"
    states_dir.mkdir()
    for name, seed in STATE_SEEDS.items():
        target = states_dir if name in ("alpha", "beta") else folder
        save_state(TunedState(random_state(seed, 2, 1, 64)), str(target / f"{name}.pth"))
    write_card(states_dir / "alpha.json", model_path)  # beta has no card
    os.environ[KEY_ENV] = KEY
    config = spec_from_dict({"serve": {
        "model": str(model_path), "states_dir": str(states_dir), "api_key_env": KEY_ENV, "max_batch_size": 4,
        "max_mounted_states": 4, "batch_wait_ms": 5.0, "max_tokens_cap": 32, "default_max_tokens": 16, "max_upload_mb": 0.25,
        "use_gpu": False}}, "test serve spec").serve
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # request logs: Ray's files
    port = free_port()  # after Ray is up: its processes bind ephemeral ports too
    try:
        start_serve("127.0.0.1", port)
        serve.run(build_app(config, read_api_key(config)), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", folder
    finally:
        serve.shutdown()
        ray.shutdown()
        del os.environ[KEY_ENV]


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the `playwright` package is not installed")
    with sync_api.sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport=DESKTOP)
        context.set_default_timeout(WAIT_MS)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@pytest.fixture(scope="module")
def script_errors(page) -> list:
    """Uncaught errors and console errors of the page (a CSP violation is one); refused API calls are not."""
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda message: message.type == "error"
            and not message.text.startswith("Failed to load resource") and errors.append(message.text))
    return errors


def test_page_is_served_without_network_and_root_redirects(server):
    url = server[0]
    root = httpx.get(url + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/playground"
    index = httpx.get(url + "/playground")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in index.headers["content-security-policy"]
    assert "http" not in index.text  # no CDN, fonts or scripts from elsewhere
    assert httpx.get(url + "/playground/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(url + "/v1/states/alpha").status_code == 401  # the page is public; the API is not
    missing = httpx.get(url + "/playground/secret.py")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "no playground file 'secret.py'"


def greedy_chat_reply(api: httpx.Client, model: str, messages: list | None = None) -> str:
    body = {"model": model, "messages": messages or [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "top_p": 1, "seed": 1}
    return api.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def connect(page, url: str) -> None:
    """Open the page with the key unless an earlier test left it connected (so a test also runs after a failure)."""
    if page.url.endswith("/playground") and page.is_visible("#main"):
        return
    page.goto(url + "/playground")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#main", state="visible")


def summary(page, name: str) -> str:
    return page.text_content(f"#state-list li[data-name='{name}'] .summary")


def test_three_columns_stream_the_apis_greedy_replies(server, api, page, script_errors, tmp_path):
    from playwright.sync_api import expect
    page.goto(server[0] + "/")
    assert page.url.endswith("/playground")
    page.fill("#key-input", "wrong-key")
    page.press("#key-input", "Enter")
    page.wait_for_selector("#message.error")
    assert page.text_content("#message") == httpx.get(server[0] + "/v1/models").json()["error"]["message"]
    assert page.is_hidden("#main")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#main", state="visible")
    assert page.evaluate("sessionStorage.getItem('rwkvray-api-key')") == KEY

    models = [BASE, "alpha", "beta"]
    for i, name in enumerate(models):
        page.select_option(f"#col-{i}-model", name)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#prompt", PROMPT)
    page.focus("#prompt")
    for _ in range(5):  # the send button is reachable by keyboard from the prompt
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "send":
            break
    assert page.evaluate("document.activeElement.id") == "send"
    page.keyboard.press("Enter")
    for i in range(3):  # (the page's CSP forbids eval, so waits use selectors, not wait_for_function)
        page.wait_for_selector(f"#col-{i}-output[data-state='done']")

    expect(page.locator("#state-list li[data-name='alpha'] .badge")).to_have_text("mounted · states_dir")
    assert api.get("/v1/states/alpha").json()["card"]["steps"] == 40
    expect(page.locator("#state-list li[data-name='alpha'] .summary")).to_have_text(
        "method state · 40 steps · final loss 1.2346 · data train.jsonl · base matches")
    assert summary(page, "beta") == "no state card: the base model it was tuned on is unknown"
    replies = [page.text_content(f"#col-{i}-output .reply") for i in range(3)]
    assert replies == [greedy_chat_reply(api, name) for name in models]
    assert len(set(replies)) == 3  # the states make the difference
    for i in range(3):
        assert page.text_content(f"#col-{i}-output .user") == PROMPT
        stats = page.text_content(f"#col-{i}-stats")
        assert "first token" in stats and "tok/s" in stats, stats

    shot = tmp_path / "playground-1280x800.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get(UPDATE_SCREENSHOT_ENV) == "1":
        shutil.copy(shot, README_SCREENSHOT)

    page.set_viewport_size(PHONE)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.locator("#send").scroll_into_view_if_needed()
        assert page.is_visible("#send") and page.is_visible("#col-2-output")
        page.screenshot(path=str(tmp_path / "playground-390x844.png"), full_page=True)
    finally:
        page.set_viewport_size(DESKTOP)

    page.fill("#prompt", FOLLOW_UP)  # a second turn: each column sends its own history
    page.press("#prompt", "Control+Enter")
    for i, name in enumerate(models):
        page.wait_for_selector(f"#col-{i}-output[data-state='done']")
        history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": replies[i]},
                   {"role": "user", "content": FOLLOW_UP}]
        assert page.locator(f"#col-{i}-output .reply").nth(1).text_content() == greedy_chat_reply(api, name, history)
    assert script_errors == []


def drop_file(page, name: str, data: bytes) -> None:
    """A real drop event on the drop zone, carrying a File built in the page."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: 'application/octet-stream'}));
            return transfer;
        }""", [name, base64.b64encode(data).decode()])
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})


def listed(page, name: str) -> str:
    return page.text_content(f"#state-list li[data-name='{name}'] .badge")


def test_upload_by_drop_and_file_input_then_unmount(server, api, page, script_errors):
    from playwright.sync_api import expect
    url, folder = server
    assert api.post("/v1/states", json={"name": "alpha"}).status_code == 200  # mounted, whatever ran before
    connect(page, url)
    page.fill("#upload-name", "gamma")
    drop_file(page, "anything.pth", (folder / "gamma.pth").read_bytes())
    page.wait_for_selector("#state-list li[data-name='gamma']")
    assert listed(page, "gamma") == "mounted · upload"

    page.set_input_files("#upload-file", str(folder / "delta.pth"))  # the keyboard path; named after the file
    page.wait_for_selector("#state-list li[data-name='delta']")
    assert listed(page, "delta") == "mounted · upload"
    assert "delta" in page.eval_on_selector("#col-0-model", "s => [...s.options].map(o => o.value)")
    mounted = {entry["name"]: entry["source"] for entry in api.get("/v1/states").json()["mounted"]}
    assert mounted["gamma"] == mounted["delta"] == "upload"

    garbage = b"not a state file"
    drop_file(page, "junk.pth", garbage)
    expected = api.post("/v1/states", json={"name": "junk", "data": base64.b64encode(garbage).decode()})
    assert expected.status_code == 400
    page.wait_for_selector("#message.error")
    assert page.text_content("#message") == expected.json()["error"]["message"]

    page.click("button[aria-label='Unmount gamma']")  # an upload is kept in states_dir: it stays listed
    expect(page.locator("#state-list li[data-name='gamma'] .badge")).to_have_text("unmounted")
    assert page.text_content("#message") == "Unmounted gamma."
    listing = api.get("/v1/states").json()
    assert "gamma" not in [entry["name"] for entry in listing["mounted"]]
    assert "gamma" in listing["unmounted"] and "gamma" in listing["known"]
    assert "gamma" not in page.eval_on_selector("#col-0-model", "s => [...s.options].map(o => o.value)")

    page.click("button[aria-label='Unmount alpha']")  # a states_dir state stays listed, ready to mount again
    expect(page.locator("#state-list li[data-name='alpha'] .badge")).to_have_text("unmounted")
    page.click("button[aria-label='Mount alpha']")
    expect(page.locator("#state-list li[data-name='alpha'] .badge")).to_have_text("mounted · states_dir")
    assert page.text_content("#message") == "Mounted alpha."

    page.click("button[aria-label='Show the card of alpha']")
    page.wait_for_selector("#details", state="visible")
    shown = page.text_content("#details-body")
    assert shown and json.loads(shown) == api.get("/v1/states/alpha").json()
    unknown = api.get("/v1/states/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == (
        "no state 'nope': it is neither mounted nor a file in the states folder")
    assert script_errors == []


def test_blend_of_two_states_becomes_a_column_choice(server, api, page, script_errors):
    from playwright.sync_api import expect
    connect(page, server[0])
    page.select_option("#blend-state-0", "alpha")
    page.select_option("#blend-state-1", "beta")
    page.select_option("#blend-state-2", "")
    page.fill("#blend-weight-0", "0.7")
    page.fill("#blend-weight-1", "0.3")
    assert page.text_content("#blend-weight-0-value") == "0.70"
    page.fill("#blend-name", "mix")
    page.eval_on_selector("#message", "box => { box.textContent = ''; }")
    page.click("#blend-button")
    page.wait_for_selector("#message:not(:empty)")
    assert page.text_content("#message") == "Blend mix mounted."
    expect(page.locator("#state-list li[data-name='mix'] .badge")).to_have_text("mounted · blend")
    assert summary(page, "mix") == ("blend of alpha 0.7, beta 0.3 · method blend · blended from ['beta'], whose base "
                                    "model is unknown")  # beta has no card
    assert "mix" in page.eval_on_selector("#col-0-model", "s => [...s.options].map(o => o.value)")
    assert "mix" in [entry["name"] for entry in api.get("/v1/states").json()["mounted"]]

    asked = []  # the same name again: the page asks, and replaces only when the answer is yes
    for answer, said in ((False, "Not replaced."), (True, "Blend mix mounted.")):
        page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept() if answer else dialog.dismiss()))
        page.select_option("#blend-state-2", "")  # the list was redrawn: its empty third row picked a state
        page.fill("#blend-weight-0", "0.6")
        page.fill("#blend-weight-1", "0.4")
        page.eval_on_selector("#message", "box => { box.textContent = ''; }")
        page.click("#blend-button")
        page.wait_for_selector("#message:not(:empty)")
        assert page.text_content("#message") == said
    assert asked == ["state 'mix' already exists. Replace it? The current one is kept as a previous version."] * 2
    assert api.get("/v1/states/mix").json()["card"]["blend"] == {"alpha": 0.6, "beta": 0.4}
    assert api.get("/v1/states/mix.prev").json()["card"]["blend"] == {"alpha": 0.7, "beta": 0.3}

    page.select_option("#col-2-model", "mix")  # a new choice starts a fresh history in that column
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#prompt", PROMPT)
    page.click("#send")
    page.wait_for_selector("#col-2-output[data-state='done']")
    assert page.text_content("#col-2-output .reply") == greedy_chat_reply(api, "mix")
    assert greedy_chat_reply(api, "mix") not in (greedy_chat_reply(api, "alpha"), greedy_chat_reply(api, "beta"))
    assert script_errors == []


EVAL_ROWS = [
    {"prompt": "User: Who are you?\n\nAssistant:", "choices": [" Orbit", " a cat", " nobody"], "answer": 0},
    {"prompt": "The sea is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"prompt": "User: Tell me about the sea.\n\nAssistant:", "reference": "waves"},
    {"text": "The sea is deep and blue."},
]


def eval_cell(row: dict) -> str:
    """A results row as the Evaluate table shows it (accuracies in percent)."""
    scale, digits = (100, 1) if row["metric"] != "loss" else (1, 3)
    return " ".join([f"{scale * row['value']:.{digits}f}",
                     f"[{scale * row['ci95'][0]:.{digits}f}, {scale * row['ci95'][1]:.{digits}f}]"])


def test_evaluate_panel_scores_states_against_base(server, api, page, script_errors):
    from playwright.sync_api import expect
    connect(page, server[0])
    page.fill("#eval-rows", '{"prompt": "Q", "choices": ["a", "b"], "answer": 7}')
    page.eval_on_selector("#message", "box => { box.textContent = ''; }")
    page.click("#eval-run")
    page.wait_for_selector("#message.error:not(:empty)")
    assert page.text_content("#message") == 'rows[0]: "answer" must be an index into choices, 0 to 1 (got 7)'

    jsonl = "\n".join(json.dumps(row) for row in EVAL_ROWS) + "\n"
    transfer = page.evaluate_handle(
        """(text) => { const t = new DataTransfer(); t.items.add(new File([text], 'quiz.jsonl')); return t; }""",
        jsonl)
    page.dispatch_event("#eval-drop", "drop", {"dataTransfer": transfer})
    expect(page.locator("#eval-rows")).to_have_value(jsonl)  # the dropped file's text, read by the page
    page.check("#eval-states input[value='alpha']")
    page.check("#eval-states input[value='beta']")
    page.fill("#eval-max-tokens", "8")
    page.click("#eval-run")
    page.wait_for_selector("#eval-results:not([hidden])")

    expected = api.post("/v1/evals", json={"states": ["alpha", "beta"], "rows": EVAL_ROWS, "max_tokens": 8}).json()
    headers = page.locator("#eval-table th").all_text_contents()
    assert headers[:4] == ["state", "rows mc_acc %", "rows exact %", "rows contains %"]
    assert [h for h in headers if h in (BASE, "base", "alpha", "beta")] == ["base", "alpha", "beta"]
    assert page.locator("#eval-table td").all_text_contents() == [eval_cell(row) for row in expected["results"]]
    comparisons = page.locator("#eval-comparisons li").all_text_contents()
    assert len(comparisons) == 8 and comparisons[0].startswith("alpha vs base: rows mc_acc ")
    assert " pts (95% CI " in comparisons[0] and comparisons[-1].startswith("beta vs base: rows loss ")

    predictions = {}
    for row in expected["details"]:
        if "prediction" in row:
            predictions.setdefault(row["index"], set()).add(json.dumps(row["prediction"]))
    disagreeing = sorted(index for index, seen in predictions.items() if len(seen) > 1)
    assert 2 in disagreeing  # the states' greedy answers differ
    items = page.locator("#eval-disagree details")
    assert [int(i) for i in items.evaluate_all("ds => ds.map(d => d.dataset.index)")] == disagreeing
    generation = page.locator("#eval-disagree details[data-index='2']")
    generation.locator("summary").click()
    texts = generation.locator("pre").all_text_contents()
    assert [text.split(":")[0] for text in texts] == ["base", "alpha", "beta"]
    assert [text.endswith("✓") for text in texts] == [r["correct"] for r in expected["details"] if r["index"] == 2]
    assert script_errors == []
