"""run.storage_path as an s3:// URI, against moto's S3 server on 127.0.0.1 (started and stopped by PID in conftest.py).

A 2-worker DeepSpeed run whose model and data exist only in the bucket loses a worker, resumes from the bucket,
and the final state arrives from the bucket: nothing passes between workers and driver outside it, and the node
downloads each input once, into its cache.
"""
import hashlib
import json
import os

import pytest
import torch

from rwkvray.files import cache, storage
from rwkvray.spec import spec_from_dict
from rwkvray.launch.run import run_on_ray
from rwkvray.model.state_file import load_state

ray = pytest.importorskip("ray")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.ray
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "rwkvray", "sample_data", "persona.jsonl")


def test_killed_worker_resumes_from_the_bucket(s3_ray, make_tiny_model, tmp_path, fault_marker):
    import pyarrow.fs
    model = open(make_tiny_model(2, 128), "rb").read()
    storage.write_bytes("s3://runs/inputs/tiny.pth", model)
    storage.write_bytes("s3://runs/inputs/persona.jsonl", open(SAMPLE, "rb").read())
    assert cache.entries() == []
    spec = spec_from_dict({
        "run": {"name": "s3run", "storage_path": "s3://runs/rwkvray", "checkpoint_every_steps": 4, "max_failures": 1},
        "model": {"path": "s3://runs/inputs/tiny.pth"},
        "data": {"file": "s3://runs/inputs/persona.jsonl", "ctx_len": 32, "loss_mask": "qa"},
        "optim": {"lr_init": 0.2, "lr_final": 0.05},
        "trainer": {"epoch_count": 1, "epoch_steps": 8, "micro_bsz": 2, "precision": "fp32", "op": "torch",
                    "seed": 7, "proj_dir": str(tmp_path / "local")},
        "deepspeed": {"stage": 2},
        "scaling": {"num_workers": 2},
    }, "test")
    result = run_on_ray(spec)
    assert fault_marker.exists() and result.error is None
    bucket = pyarrow.fs.FileSystem.from_uri("s3://runs/rwkvray/s3run")[0]
    with bucket.open_input_stream("runs/rwkvray/s3run/rwkv-final.pth") as f:
        (tmp_path / "from-bucket.pth").write_bytes(f.read())
    from_bucket = load_state(str(tmp_path / "from-bucket.pth")).time_state
    assert from_bucket.shape == (2, 2, 64, 64) and from_bucket.abs().max() > 0
    assert torch.equal(from_bucket, load_state(str(tmp_path / "local" / "rwkv-final.pth")).time_state)
    names = {info.base_name for info in bucket.get_file_info(pyarrow.fs.FileSelector("runs/rwkvray/s3run"))}
    assert {"rwkv-0.pth", "rwkv-0.json", "rwkv-final.json", "metrics.jsonl", "loss.png"} <= names
    card = json.loads(storage.read_bytes("s3://runs/rwkvray/s3run/rwkv-final.json"))
    assert card["base"]["sha256"] == hashlib.sha256(model).hexdigest() and card["base"]["file"] == "tiny.pth"
    # the driver and both workers, before and after the restart, share this node's one copy of each
    inputs = ["s3://runs/inputs/persona.jsonl", "s3://runs/inputs/tiny.pth"]
    assert [entry["uri"] for entry in cache.entries()] == inputs
    steps = [line for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 8
