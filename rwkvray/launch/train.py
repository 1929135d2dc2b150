"""`rwkvray run`: a TorchTrainer whose workers each run the plain training loop with a DeepSpeed engine."""
import os
import sys

import torch

from rwkvray.config import require_training_blocks
from rwkvray.metrics import summarize
from rwkvray.train_loop import export_final_state, train

FAULT_STEP_ENV = "RWKVRAY_FAULT_AT_STEP"     # chaos testing: the last worker exits after reporting this step
FAULT_MARKER_ENV = "RWKVRAY_FAULT_MARKER"    # file that records the fault already happened (so it fires once)


class RayContext:
    """Who this worker is, under Ray Train; checkpoints go through ray.train.report."""

    def __init__(self, fault: dict | None = None):
        import ray.train
        import ray.train.torch
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.distributed = True
        self.fault = fault

    def resume(self, load) -> None:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                load(folder)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if self.fault and self.rank == self.world_size - 1 and metrics.get("step") == self.fault["step"]:
            _crash_once(self.fault["marker"])


def _crash_once(marker: str) -> None:
    """Chaos testing: kill this worker process the first time only (the marker file remembers)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def _fault_from_env() -> dict | None:
    step, marker = os.environ.get(FAULT_STEP_ENV), os.environ.get(FAULT_MARKER_ENV)
    return {"step": int(step), "marker": marker} if step and marker else None


def worker_loop(config: dict) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo collectives
    train(config["spec"], RayContext(config.get("fault")))


def build_trainer(spec, callbacks=()):
    """The TorchTrainer for a spec: one worker per scaling.num_workers, each running `worker_loop`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    scaling = spec.scaling
    return TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec, "fault": _fault_from_env()},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=scaling.resources_per_worker or None,
                                     placement_strategy=scaling.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=spec.run.name, storage_path=spec.run.storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=spec.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints)),
    )


def warn_if_cluster_too_small(spec) -> None:
    """Ray waits, silently, for GPUs no node has yet (an autoscaler may add them): say so at once."""
    import ray
    needed = spec.scaling.num_workers * spec.scaling.resources_per_worker.get("GPU", 1) if spec.scaling.use_gpu else 0
    available = ray.cluster_resources().get("GPU", 0)
    if needed > available:
        print(f"warning: {spec.source} asks for {needed:g} GPUs but the Ray cluster has {available:g} now; "
              "waiting for an autoscaler to add nodes", file=sys.stderr)


def run_on_ray(spec, address: str | None = None):
    """Fit the spec on the cluster, print the final state file's path; returns the Ray Train result."""
    from rwkvray.launch.ray_session import ray_session
    require_training_blocks(spec)
    with ray_session(address):
        warn_if_cluster_too_small(spec)
        result = build_trainer(spec).fit()
        print(summarize(spec.trainer.proj_dir))
        with result.checkpoint.as_directory() as folder:
            export_final_state(spec, folder)
    return result
