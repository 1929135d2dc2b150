"""The optimizer side of a worker: DeepSpeed at every world size, one worker included.

The training loop uses forward, backward, step, set_lr, gathered and save/load.
"""
import contextlib
import io
import os

import torch

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU collectives, compiled on a machine's first CPU run


def cpu_comm_op_missing() -> bool:
    """Whether DeepSpeed has yet to compile its CPU communication op here (about a minute, needs a C++ compiler):
    neither installed with DeepSpeed nor in torch's extension cache."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory
    if installed_ops.get(SHM_OP, False):
        return False
    return not os.path.exists(os.path.join(_get_build_directory(SHM_OP, verbose=False), SHM_OP + ".so"))


def join_deepspeed_comm() -> None:
    """DeepSpeed's comm layer over the process group already joined. On CPU it loads its shared-memory op and
    prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every worker, cached or
    not: that line is dropped (rank 0 says when the op is really built), anything else printed passes."""
    import deepspeed.comm
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend())
    for line in printed.getvalue().splitlines():
        if not (SHM_OP in line and line.endswith(" built successfully")):
            print(line, flush=True)


class DeepSpeedEngine:
    """`deepspeed.initialize` on the PEFT module, with only its trainable parameters given to the optimizer."""

    def __init__(self, module, optim_spec, ds_config: dict):
        import deepspeed
        join_deepspeed_comm()
        params = module.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=optim_spec.lr_init, betas=tuple(optim_spec.betas),
                                      eps=optim_spec.eps, weight_decay=optim_spec.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=params,
                                                                 optimizer=optimizer, config=ds_config)
        self.module = self.engine.module

    def __call__(self, *batch):
        return self.engine(*batch)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()

    def set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def gathered(self):
        """Whole trainable tensors on every rank (ZeRO-3 keeps only a shard of each between steps)."""
        import deepspeed
        return deepspeed.zero.GatheredParameters(self.module.trainable_parameters(), enabled=self.engine.zero_optimization_stage() == 3)

    def save(self, folder: str):
        """Trainable tensors and optimizer state only: the frozen base is read again from model.path."""
        self.engine.save_checkpoint(folder, tag="deepspeed", exclude_frozen_parameters=True)

    def load(self, folder: str):
        self.engine.load_checkpoint(folder, tag="deepspeed", load_module_strict=False)  # no frozen tensors saved
