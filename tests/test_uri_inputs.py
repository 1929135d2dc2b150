"""Inputs named by URI (s3://), against moto's S3 server on 127.0.0.1: the node-local download cache
(rwkvray/files/cache.py) and the checks before Ray starts. The Ray runs with inputs in the bucket are in
test_s3_storage.py (a killed worker resumes) and test_ray_cluster.py (two nodes, two caches)."""
import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from rwkvray.cli import main
from rwkvray.files import cache, storage
from rwkvray.model.state_card import base_fingerprint

pytest.importorskip("moto.server")
REPO = os.path.join(os.path.dirname(__file__), "..")
SAMPLE = os.path.join(REPO, "rwkvray", "sample_data", "persona.jsonl")


def in_subprocess(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_the_processes_of_a_node_download_once_and_the_sha256_is_kept(s3_env, make_tiny_model, capsys):
    model = open(make_tiny_model(2, 64), "rb").read()
    storage.write_bytes("s3://runs/inputs/shared.pth", model)
    workers = [in_subprocess("from rwkvray.files.cache import local_copy; "
                             "print(local_copy('s3://runs/inputs/shared.pth'))") for _ in range(2)]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and open(paths.pop(), "rb").read() == model
    downloads = [line for _, err in outputs for line in err.splitlines() if "downloading" in line]
    assert len(downloads) == 1 and downloads[0].startswith("rwkvray cache: downloading s3://runs/inputs/shared.pth")
    path = cache.local_copy("s3://runs/inputs/shared.pth")
    assert cache.recorded_sha256(path) == hashlib.sha256(model).hexdigest() == base_fingerprint(path)["sha256"]
    assert main(["cache", "ls"]) == 0
    assert f"s3://runs/inputs/shared.pth\t{len(model) / 1e6:.1f} MB\t{path}" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 cache entry" in capsys.readouterr().out and not os.path.exists(path)
    storage.write_bytes("s3://runs/inputs/shared.pth", model[:-1] + b"x")  # a changed object is a new entry
    assert cache.recorded_sha256(cache.local_copy("s3://runs/inputs/shared.pth")) != hashlib.sha256(model).hexdigest()
    cache.clear()


def test_a_download_killed_halfway_is_redone_cleanly(s3_env):
    payload = os.urandom(1 << 20)
    storage.write_bytes("s3://runs/inputs/big.bin", payload)
    killed = in_subprocess(  # SIGKILL at the first progress line after half the object is on disk
        "import os, signal; from rwkvray.files import cache\n"
        "cache.CHUNK_BYTES, cache.PROGRESS_EVERY_S = 1 << 16, 0\n"
        "def die(uri, done, size, seconds):\n"
        "    if done >= size // 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "cache._show_progress = die\n"
        "cache.local_copy('s3://runs/inputs/big.bin')")
    killed.communicate(timeout=120)
    assert killed.returncode == -9
    [folder] = [os.path.join(cache.cache_dir(), name) for name in os.listdir(cache.cache_dir())
                if not name.endswith(".lock")]
    assert os.listdir(folder) == ["big.bin.part"] and 0 < os.path.getsize(os.path.join(folder, "big.bin.part"))
    assert cache.entries() == []
    path = cache.local_copy("s3://runs/inputs/big.bin")
    assert open(path, "rb").read() == payload and sorted(os.listdir(folder)) == ["big.bin", "entry.json"]
    cache.clear()


def write_spec(tmp_path, model: str, data: dict) -> str:
    spec = {"run": {"name": "missing", "storage_path": "s3://runs/out"}, "model": {"path": model}, "data": data,
            "trainer": {"epoch_count": 1, "epoch_steps": 2, "micro_bsz": 1, "proj_dir": str(tmp_path / "out")}}
    path = tmp_path / f"job-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_uri_that_does_not_exist_is_one_line_before_ray_starts(s3_env, make_tiny_model, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    model = "s3://runs/inputs/model.pth"
    storage.write_bytes(model, open(make_tiny_model(2, 64), "rb").read())
    storage.write_bytes("s3://runs/inputs/half.bin", b"\0\0")
    jsonl = {"file": SAMPLE, "ctx_len": 16}
    cases = [
        (["run", write_spec(tmp_path, "s3://runs/inputs/nope.pth", jsonl)],
         "model.path: not found: s3://runs/inputs/nope.pth"),
        (["run", write_spec(tmp_path, model, {"file": "s3://runs/inputs/gone.jsonl"})],
         "data.file: not found: s3://runs/inputs/gone.jsonl"),
        (["run", write_spec(tmp_path, model, {"file": "s3://runs/inputs/half", "type": "binidx"})],
         "data.file: binidx not found: s3://runs/inputs/half.idx"),
        (["train", "--load_model", "s3://runs/inputs/nope.pth", "--data_file", SAMPLE, "--proj_dir",
          str(tmp_path / "flags")], "--load_model: not found: s3://runs/inputs/nope.pth"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
    assert not ray.is_initialized() and cache.entries() == []
