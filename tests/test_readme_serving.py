"""The README's serving steps as a newcomer follows them: `bash jobs/demo.sh`, then
`RWKVRAY_API_KEY=secret rwkvray serve jobs/serve.yaml`, then the README's Python snippet, which must print the
persona state's reply with no step in between. Then a SIGTERM to serve's process group, as a supervisor or a
container runtime sends it, stops it within 15 s.

The folder is laid out like the repository root (jobs/, rwkvray/). Two things differ from the
repository's files, and only these: the demo spec trains 3 steps on one worker (the 180 of the demo take
minutes), and serve.yaml's port is a free one (other servers run on this machine)."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.helpers import free_port

pytest.importorskip("ray")
pytest.importorskip("openai")
pytestmark = pytest.mark.ray
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def readme_snippet(language: str, section: str) -> str:
    """The first ```language block of the README's `## section`."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", body, re.S).group(1)


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "rwkvray"
    (root / "jobs").mkdir(parents=True)
    os.symlink(os.path.join(REPO, "rwkvray"), root / "rwkvray")  # the package (its sample_data), as in a clone
    shutil.copy(os.path.join(REPO, "jobs", "demo.sh"), root / "jobs")
    with open(os.path.join(REPO, "jobs", "demo_state_cpu.yaml")) as f:
        demo = yaml.safe_load(f)
    assert demo["run"]["publish"] == {"states_dir": "out/states", "name": "persona"}
    demo["trainer"].update(epoch_count=1, epoch_steps=3)
    demo["scaling"]["num_workers"] = 1
    (root / "jobs" / "demo_state_cpu.yaml").write_text(yaml.safe_dump(demo))
    with open(os.path.join(REPO, "jobs", "serve.yaml")) as f:
        serve = yaml.safe_load(f)
    assert serve["serve"]["states_dir"] == "out/states" and serve["serve"]["port"] == 8000
    serve["serve"]["port"] = free_port()
    (root / "jobs" / "serve.yaml").write_text(yaml.safe_dump(serve))
    return root, serve["serve"]["port"]


def plain_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray instance of its own
    return {**env, "PATH": BIN + os.pathsep + env["PATH"], **extra}


def wait_for_line(path, prefix: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in path.read_text(errors="replace").splitlines()):
        assert process.poll() is None, path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {prefix!r} line in {timeout} s"
        time.sleep(1)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_readme_demo_then_serve_then_snippet_prints_the_reply_and_sigterm_stops_serve(checkout, tmp_path):
    root, port = checkout
    demo = subprocess.run(["bash", "jobs/demo.sh"], cwd=root, env=plain_env(), capture_output=True, text=True,
                          timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert f"published persona: {root / 'out' / 'states' / 'persona.pth'}" in demo.stdout.splitlines()

    command = readme_snippet("bash", "Serving tuned states (Ray Serve, OpenAI-compatible)").split("#")[0].split()
    assert command == ["RWKVRAY_API_KEY=secret", "rwkvray", "serve", "jobs/serve.yaml"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command[1:], cwd=root, env=plain_env(RWKVRAY_API_KEY="secret"), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_line(log, "serving tiny at ", server, timeout=300)
        snippet = readme_snippet("python", "Serving tuned states (Ray Serve, OpenAI-compatible)")
        assert 'model="persona"' in snippet and "print(" in snippet
        reply = subprocess.run([sys.executable, "-c", snippet.replace(":8000/", f":{port}/")], cwd=root,
                               capture_output=True, text=True, timeout=120)
        assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr[-3000:]
        states = httpx.get(f"http://127.0.0.1:{port}/v1/states", headers={"Authorization": "Bearer secret"}).json()
        persona = next(s for s in states["mounted"] if s["name"] == "persona")
        assert persona["source"] == "states_dir" and persona["base_match"] is True
        assert persona["card"]["method"] == "state" and persona["card"]["steps"] == 3

        os.killpg(server.pid, signal.SIGTERM)
        started = time.monotonic()
        server.wait(timeout=15)
        assert time.monotonic() - started < 15
        assert not port_open(port)
        assert log.read_text().splitlines()[-1] == "stopped"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
