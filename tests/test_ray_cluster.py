"""The 2-worker DeepSpeed job on a simulated 2-node cluster (ray.cluster_utils.Cluster, one CPU per node).

No shared disk: the model and a binidx corpus exist only in an S3 bucket (moto on 127.0.0.1), the run's storage
too, and each node has its own download cache (RWKVRAY_CACHE_DIR, set for each node's raylet as it starts)."""
import os

import numpy as np
import pytest

from rwkvray.files import cache, storage
from rwkvray.launch.run import run_on_ray
from rwkvray.model.state_file import load_state
from rwkvray.spec import spec_from_dict
from tests import worker_hooks
from tests.helpers import write_binidx

ray = pytest.importorskip("ray")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def node_caches(tmp_path_factory):
    return [str(tmp_path_factory.mktemp(f"node{i}-cache")) for i in range(2)]


@pytest.fixture(scope="module")
def two_node_cluster(s3_env, node_caches):
    from ray.cluster_utils import Cluster
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.CACHE_ENV, node_caches[0])  # each raylet, and the workers it starts, keep their own
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        patch.setenv(cache.CACHE_ENV, node_caches[1])
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=worker_hooks.runtime_env())
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_on_two_nodes_read_everything_from_the_bucket(two_node_cluster, node_caches, tiny_model,
                                                                   tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    storage.write_bytes("s3://runs/inputs/model.pth", open(tiny_model, "rb").read())
    docs = np.random.default_rng(0).integers(1, 65536, size=(24, 40)).tolist()
    write_binidx(str(tmp_path / "corpus"), docs)
    for suffix in (".bin", ".idx"):
        storage.write_bytes(f"s3://runs/inputs/corpus{suffix}", (tmp_path / f"corpus{suffix}").read_bytes())
        os.remove(tmp_path / f"corpus{suffix}")
    assert [os.listdir(folder) for folder in node_caches] == [[], []]
    spec = spec_from_dict({
        "run": {"name": "two-nodes", "storage_path": "s3://runs/cluster", "checkpoint_every_steps": 4},
        "model": {"path": "s3://runs/inputs/model.pth"},
        "data": {"file": "s3://runs/inputs/corpus", "type": "binidx", "ctx_len": 32},
        "optim": {"lr_init": 0.2, "lr_final": 0.05},
        "trainer": {"epoch_count": 1, "epoch_steps": 6, "micro_bsz": 2, "precision": "fp32", "op": "torch",
                    "seed": 7, "proj_dir": str(tmp_path / "out")},
        "deepspeed": {"stage": 1},
        "scaling": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
    }, "test")
    result = run_on_ray(spec)
    assert result.error is None
    assert result.metrics["replica_divergence"] == 0.0
    final = load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    assert final.shape == (2, 2, 64, 64) and final.abs().max() > 0
    assert storage.read_bytes("s3://runs/cluster/two-nodes/rwkv-final.pth") is not None
    inputs = ["s3://runs/inputs/corpus.bin", "s3://runs/inputs/corpus.idx", "s3://runs/inputs/model.pth"]
    with pytest.MonkeyPatch.context() as patch:
        for folder in node_caches:  # one worker per node: each node downloaded each input once
            patch.setenv(cache.CACHE_ENV, folder)
            assert [entry["uri"] for entry in cache.entries()] == inputs
            assert len([name for name in os.listdir(folder) if not name.endswith(".lock")]) == 2
