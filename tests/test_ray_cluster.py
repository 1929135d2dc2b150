"""The 2-worker DeepSpeed job on a simulated 2-node cluster (ray.cluster_utils.Cluster, one CPU per node)."""
import os

import pytest

from rwkvray.launch.run import run_on_ray
from rwkvray.model.state_file import load_state
from tests import worker_hooks
from tests.helpers import spec_with, two_worker_spec

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_node_cluster():
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=worker_hooks.runtime_env())
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_spread_over_two_nodes(two_node_cluster, tiny_model, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    spec = spec_with(two_worker_spec(tiny_model, tmp_path, "two-nodes"),
                     scaling={"placement_strategy": "STRICT_SPREAD"}, trainer={"epoch_count": 1})
    result = run_on_ray(spec)
    assert result.error is None
    assert result.metrics["replica_divergence"] == 0.0
    final = load_state(os.path.join(spec.trainer.proj_dir, "rwkv-final.pth")).time_state
    assert final.shape == (2, 2, 64, 64) and final.abs().max() > 0
