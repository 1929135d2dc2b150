"""`rwkvray run` and `rwkvray train`: a TorchTrainer whose workers each run the plain training loop with a DeepSpeed
engine."""
import sys

from rwkvray.errors import UserError
from rwkvray.files import storage
from rwkvray.spec import check_model_expectations
from rwkvray.launch.outputs import check_publishable, copy_to_proj_dir, export_outputs, publish_final
from rwkvray.launch.ray_session import off_main_thread, worker_env
from rwkvray.launch.resume import check_rerun, newest_intact_checkpoint
from rwkvray.train.loop import WorkerContext, train

# Ray Train turns a worker's print into a log record and, since Ray replaces the worker's sys.stdout, also prints
# it: every line would show twice. Plain print: once, through Ray's log forwarding.
PLAIN_PRINT = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def worker_loop(config: dict) -> None:
    train(config["spec"], WorkerContext.ray_train_worker())


def build_trainer(spec, callbacks=()):
    """The TorchTrainer for a spec: one worker per scaling.num_workers, each running `worker_loop`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    scaling = spec.scaling
    return TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=scaling.resources_per_worker or None,
                                     placement_strategy=scaling.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=spec.run.name, storage_path=spec.run.storage_path, callbacks=list(callbacks),
                             worker_runtime_env={"env_vars": {**worker_env(scaling.use_gpu), **PLAIN_PRINT}},
                             failure_config=FailureConfig(max_failures=spec.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=ray_checkpoints_kept(spec))),
    )


def ray_checkpoints_kept(spec) -> int:
    """How many checkpoints Ray keeps so that it never deletes the last intact one: run.keep_checkpoints, plus
    the newest (it gets its manifest only after Ray registers it and deletes the oldest), plus the damaged ones
    newer than the newest intact checkpoint (Ray counts them as checkpoints)."""
    return spec.run.keep_checkpoints + 1 + newest_intact_checkpoint(spec, storage.run_dir(spec))[0]


def raise_worker_user_error(err: Exception) -> None:
    """A worker that stopped on bad input (a data file changed under the run, say) ends the run with its one
    line, not with Ray's report of the failed worker group."""
    for failure in getattr(err, "worker_failures", {}).values():
        for _ in range(8):  # the error as raised, under Ray's wrappers
            if isinstance(failure, UserError):
                raise UserError(f"a worker stopped: {failure}") from None
            failure = getattr(failure, "cause", None) or getattr(failure, "__cause__", None)


def warn_if_cluster_too_small(spec) -> None:
    """Ray waits, silently, for GPUs no node has yet (an autoscaler may add them): say so at once."""
    import ray
    needed = spec.scaling.num_workers * spec.scaling.resources_per_worker.get("GPU", 1) if spec.scaling.use_gpu else 0
    available = ray.cluster_resources().get("GPU", 0)
    if needed > available:
        print(f"warning: {spec.source} asks for {needed:g} GPUs but the Ray cluster has {available:g} now; "
              "waiting for an autoscaler to add nodes", file=sys.stderr)


def check_model_file(model, source: str) -> None:
    from rwkvray.files.cache import local_copy
    from rwkvray.model.checkpoint import infer_dims, read_tensor_dict
    check_model_expectations(model, infer_dims(read_tensor_dict(local_copy(model.path))), source)


def run_on_ray(spec, address: str | None = None, allow_changed_spec: bool = False):
    """Fit the spec on the cluster, export its outputs from run storage; returns the Ray Train result, or None
    when the run was already complete (its outputs are copied to proj_dir again)."""
    from rwkvray.launch.ray_session import ray_session
    check_model_file(spec.model, spec.source)  # a wrong n_layer fails here, not after Ray has started
    step = check_rerun(spec, allow_changed_spec)
    if step is not None and step >= spec.trainer.epoch_count * spec.trainer.epoch_steps:
        print(f"outputs in {copy_to_proj_dir(spec, storage.run_dir(spec))}")
        publish_final(spec)
        return None
    check_publishable(spec)
    with ray_session(address):
        warn_if_cluster_too_small(spec)
        try:
            result = off_main_thread(build_trainer(spec).fit)
        except Exception as err:
            raise_worker_user_error(err)
            raise
        export_outputs(spec, result.checkpoint)
    publish_final(spec)
    return result
