"""The training loop every worker runs: plain PyTorch, with or without Ray around it.

`train(spec, ctx)` is the whole loop. A context says who this worker is and where checkpoints go:
LocalContext for a single process, RayContext (rwkvray.launch.train) under Ray Train.
"""
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch

from rwkvray.atomic import atomic_path
from rwkvray.data import TokenBatcher, eval_batches, load_documents, split_holdout
from rwkvray.config import check_model_expectations
from rwkvray.metrics import RunLogger
from rwkvray.model import load_model
from rwkvray.peft import build_peft
from rwkvray.peft.base import method_classes
from rwkvray.schedule import learning_rate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


@dataclass
class LocalContext:
    """One process, no Ray: the latest checkpoint lives in <proj_dir>/checkpoint."""
    proj_dir: str
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    distributed: bool = False

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.proj_dir, "checkpoint")

    def resume(self, load) -> None:
        for folder in (self.checkpoint_dir, self.checkpoint_dir + ".old"):  # .old: a crash mid-swap in report
            if os.path.exists(os.path.join(folder, "progress.json")):
                load(folder)
                return

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir is None:
            return
        old = self.checkpoint_dir + ".old"
        if os.path.exists(self.checkpoint_dir):
            os.replace(self.checkpoint_dir, old)
        shutil.copytree(checkpoint_dir, self.checkpoint_dir + ".new")
        os.replace(self.checkpoint_dir + ".new", self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class Progress:
    step: int = 0           # optimizer steps done
    best_val_loss: float | None = None


def train(spec, ctx) -> dict:
    """Run the spec's training on this worker; returns the last metrics."""
    trainer = spec.trainer
    torch.manual_seed(trainer.seed)
    if trainer.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    module = _build_module(spec, ctx.device)
    train_docs, val_docs = _load_data(spec)
    batcher = TokenBatcher(train_docs, spec.data.ctx_len, seed=trainer.seed)
    engine = _build_engine(spec, module, ctx)
    engine.module.train()  # adapter dropout on; the frozen base has no dropout of its own
    progress = Progress()
    ctx.resume(lambda folder: _load_checkpoint(folder, engine, progress, ctx.rank))

    total = trainer.epoch_count * trainer.epoch_steps
    logger = RunLogger(proj_dir(spec), total, progress.step, enabled=ctx.rank == 0,
                       wandb_project=spec.logging.wandb_project, wandb_mode=spec.logging.wandb_mode,
                       run_name=spec.run.name, config=spec.model_dump(mode="json"))
    metrics = {}
    while progress.step < total:
        metrics = _train_step(spec, engine, batcher, progress, ctx)
        progress.step += 1
        report = _report_due(spec, progress.step)
        if report and val_docs:
            metrics["val_loss"] = evaluate(engine, val_docs, spec.data.ctx_len, spec.trainer.micro_bsz, ctx.device)
        logger.log_step(**metrics)
        if report:
            _checkpoint_and_report(spec, engine, progress, metrics, ctx, logger)
    logger.finish()
    return metrics


def proj_dir(spec) -> str:
    return spec.trainer.proj_dir


def _build_module(spec, device):
    model, _ = load_model(spec.model.path, device=device, dtype=DTYPES[spec.trainer.precision])
    check_model_expectations(spec.model, model.dims, spec.source)
    model.op = spec.trainer.op
    model.grad_cp = spec.trainer.grad_cp
    return build_peft(model, spec.peft)


def _load_data(spec):
    data = spec.data
    docs = load_documents(data.file, data.type, data.loss_mask)
    if data.eval_file:
        return docs, load_documents(data.eval_file, "jsonl", data.loss_mask)
    if data.holdout_fraction > 0:
        return split_holdout(docs, data.holdout_fraction, spec.trainer.seed)
    return docs, []


def _build_engine(spec, module, ctx):
    from rwkvray.engine import DeepSpeedEngine, PlainEngine
    if ctx.distributed:
        from rwkvray.config import deepspeed_config
        return DeepSpeedEngine(module, spec.optim, deepspeed_config(spec))
    return PlainEngine(module, spec.optim, spec.trainer.grad_accum)


def _train_step(spec, engine, batcher, progress, ctx) -> dict:
    trainer, optim = spec.trainer, spec.optim
    lr = learning_rate(progress.step, trainer.epoch_count * trainer.epoch_steps, optim.lr_init, optim.lr_final,
                       optim.warmup_steps, optim.schedule)
    engine.set_lr(lr)
    start, tokens, loss_sum = time.perf_counter(), 0, 0.0
    for micro in range(trainer.grad_accum):
        batch = batcher.batch(progress.step * trainer.grad_accum + micro, ctx.rank, ctx.world_size, trainer.micro_bsz)
        loss = engine(*(t.to(ctx.device) for t in (batch.input_ids, batch.targets, batch.mask)))
        engine.backward(loss)
        engine.step()
        loss_sum += loss.item()
        tokens += batch.input_ids.numel()
    loss = _mean_over_ranks(loss_sum / trainer.grad_accum, ctx)
    tokens_per_s = tokens * ctx.world_size / (time.perf_counter() - start)
    return {"step": progress.step + 1, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}


def _mean_over_ranks(value: float, ctx) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)  # nccl reduces only GPU tensors
    torch.distributed.all_reduce(t)
    return t.item() / ctx.world_size


def _report_due(spec, step: int) -> bool:
    """Evaluate, checkpoint and report at every epoch end, every run.checkpoint_every_steps and every
    tune.eval_every_steps. Every rank reports at the same steps: under Ray Train a report is a barrier."""
    periods = [spec.trainer.epoch_steps, spec.run.checkpoint_every_steps, spec.tune.eval_every_steps if spec.tune else None]
    return any(p and step % p == 0 for p in periods)


@torch.no_grad()
def evaluate(engine, docs, ctx_len: int, micro_bsz: int, device) -> float:
    """Token-weighted mean loss over every held-out piece (each rank computes the same value)."""
    total, count = 0.0, 0.0
    engine.module.eval()
    for batch in eval_batches(docs, ctx_len, micro_bsz):
        n = batch.mask.sum().item()
        total += engine(*(t.to(device) for t in (batch.input_ids, batch.targets, batch.mask))).item() * n
        count += n
    engine.module.train()
    return total / max(count, 1.0)


def _checkpoint_and_report(spec, engine, progress, metrics, ctx, logger) -> None:
    if "val_loss" in metrics:
        progress.best_val_loss = min(metrics["val_loss"], progress.best_val_loss or metrics["val_loss"])
        metrics["best_val_loss"] = progress.best_val_loss
    epoch_end = progress.step % spec.trainer.epoch_steps == 0
    with tempfile.TemporaryDirectory() as folder:
        engine.save(folder)
        torch.save(_rng_state(), os.path.join(folder, f"rng-{ctx.rank}.pt"))  # adapter dropout continues the same
        with engine.gathered():  # ZeRO-3 partitions the trainable tensors: gather them on every rank
            metrics["replica_divergence"] = _replica_divergence(engine, ctx)
            if ctx.rank == 0:
                if epoch_end:
                    _save_epoch_files(spec, engine, progress.step // spec.trainer.epoch_steps, logger)
                _save_progress(folder, engine, progress)
        ctx.report(metrics, folder)


def _save_epoch_files(spec, engine, epoch: int, logger) -> None:
    """rwkv-<epoch>.pth every epoch_save epochs and after the last one, numbered from 0 as RWKV-PEFT does."""
    trainer = spec.trainer
    if epoch % trainer.epoch_save and epoch != trainer.epoch_count:
        return
    for method in engine.module.methods:
        path = os.path.join(proj_dir(spec), f"{method.file_prefix}-{epoch - 1}.pth")
        method.save(path)
        logger.note(f"saved {path}")


def _save_progress(folder, engine, progress) -> None:
    for method in engine.module.methods:
        method.save(os.path.join(folder, f"{method.name}.pth"))
    with open(os.path.join(folder, "progress.json"), "w") as f:
        json.dump({"step": progress.step, "best_val_loss": progress.best_val_loss}, f)


def _replica_divergence(engine, ctx) -> float:
    """Largest difference of the trainable tensors between ranks: 0 when gradients are all-reduced."""
    flat = torch.cat([p.detach().float().reshape(-1).to(ctx.device) for p in engine.module.trainable_parameters()])
    if not ctx.distributed:
        return 0.0
    high, low = flat.clone(), flat.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    return (high - low).abs().max().item()


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _load_checkpoint(folder, engine, progress, rank: int) -> None:
    engine.load(folder)
    rng_path = os.path.join(folder, f"rng-{rank}.pt")
    if os.path.exists(rng_path):  # absent when the world size changed
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(folder, "progress.json")) as f:
        saved = json.load(f)
    progress.step, progress.best_val_loss = saved["step"], saved["best_val_loss"]


def export_final_state(spec, checkpoint_dir: str) -> str:
    """Copy each method's file from the last checkpoint to <proj_dir>/<prefix>-final.pth and print where."""
    paths = []
    for cls in method_classes(spec.peft):
        path = os.path.join(proj_dir(spec), f"{cls.file_prefix}-final.pth")
        with atomic_path(path) as tmp:
            shutil.copyfile(os.path.join(checkpoint_dir, f"{cls.name}.pth"), tmp)
        print(f"final {cls.name} file: {path}")
        paths.append(path)
    return paths[0]
