"""`rwkvray run`: a TorchTrainer whose workers each run the plain training loop with a DeepSpeed engine."""
import os
import torch

from rwkvray.train_loop import export_final_state, train

FAULT_STEP_ENV = "RWKVRAY_FAULT_AT_STEP"     # chaos testing: one worker exits at this step, once
FAULT_MARKER_ENV = "RWKVRAY_FAULT_MARKER"    # file that records the fault already happened


class RayContext:
    """Who this worker is, under Ray Train; checkpoints go through ray.train.report."""

    def __init__(self):
        import ray.train
        import ray.train.torch
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.distributed = True

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
        _maybe_inject_fault(metrics.get("step"), self.rank)


def _maybe_inject_fault(step, rank) -> None:
    fault_step, marker = os.environ.get(FAULT_STEP_ENV), os.environ.get(FAULT_MARKER_ENV)
    if fault_step and marker and rank == 1 and step == int(fault_step) and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def worker_loop(config: dict) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo collectives
    train(config["spec"], RayContext())


def run_on_ray(spec, address: str | None = None) -> str:
    """Fit the spec on the cluster; returns (and prints) the path of the final state file."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rwkvray.launch.ray_session import connect
    connect(address)
    scaling = spec.scaling
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=scaling.resources_per_worker or None,
                                     placement_strategy=scaling.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=spec.run.name, storage_path=os.path.abspath(spec.run.storage_path),
                             failure_config=FailureConfig(max_failures=spec.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        return export_final_state(spec, folder)
