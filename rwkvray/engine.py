"""The optimizer side of a worker: DeepSpeed under Ray Train, plain AdamW in a single process.

Both expose the same four calls the training loop uses: forward, backward, step, and save/load.
"""
import contextlib
import os

import torch


class PlainEngine:
    """Single-process AdamW over the trainable parameters only, with accumulation and clipping."""

    def __init__(self, module, optim_spec, grad_accum: int):
        self.module = module
        self.params = module.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=optim_spec.lr_init, betas=tuple(optim_spec.betas),
                                           eps=optim_spec.eps, weight_decay=optim_spec.weight_decay)
        self.grad_clip = optim_spec.grad_clip
        self.grad_accum = grad_accum
        self.micro_steps = 0

    def __call__(self, *batch):
        return self.module(*batch)

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def gathered(self):
        return contextlib.nullcontext()

    def save(self, folder: str):
        trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
        torch.save({"trainable": trainable, "optimizer": self.optimizer.state_dict()}, os.path.join(folder, "engine.pt"))

    def load(self, folder: str):
        saved = torch.load(os.path.join(folder, "engine.pt"), map_location="cpu", weights_only=True)
        named = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(saved["optimizer"])


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
