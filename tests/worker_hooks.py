"""What the Ray tests add to each worker process from the outside, through Ray's `worker_process_setup_hook`:
the loop itself has no hook for them.

- `replica_divergence` in every report: the largest difference of the trainable tensors between ranks, 0 when
  the gradients are all-reduced.
- an optional crash: the last worker of run `crash["run"]` exits after reporting step `crash["step"]`, the first
  time only (the file `crash["marker"]` remembers), so Ray Train restarts the group from the last checkpoint.
"""
import os
import sys


def runtime_env(crash: dict | None = None) -> dict:
    """The `runtime_env` for ray.init that installs the hooks in every worker process of the session."""
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import `tests`

    def setup_worker():  # Ray wants a named function here
        install(crash)
    return {"worker_process_setup_hook": setup_worker}


def install(crash: dict | None) -> None:
    from rwkvray.train import loop
    checkpoint_and_report = loop._checkpoint_and_report

    def instrumented(spec, engine, progress, metrics, ctx, logger):
        with engine.gathered():  # ZeRO-3 partitions the trainable tensors: gather them on every rank
            metrics["replica_divergence"] = replica_divergence(engine, ctx)
        checkpoint_and_report(spec, engine, progress, metrics, ctx, logger)
        if (crash and spec.run.name == crash["run"] and metrics["step"] == crash["step"]
                and ctx.rank == ctx.world_size - 1 and not os.path.exists(crash["marker"])):
            open(crash["marker"], "w").close()
            os._exit(1)

    loop._checkpoint_and_report = instrumented


def replica_divergence(engine, ctx) -> float:
    import torch
    flat = torch.cat([p.detach().float().reshape(-1).to(ctx.device) for p in engine.module.trainable_parameters()])
    high, low = flat.clone(), flat.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    return (high - low).abs().max().item()
