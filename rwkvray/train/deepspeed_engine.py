"""The optimizer side of a worker: DeepSpeed at every world size, one worker included.

The training loop uses forward, backward, step, set_lr, gathered and save/load.
"""
import torch


class DeepSpeedEngine:
    """`deepspeed.initialize` on the PEFT module, with only its trainable parameters given to the optimizer."""

    def __init__(self, module, optim_spec, ds_config: dict):
        import deepspeed
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
