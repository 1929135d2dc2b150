"""The training loop every worker runs: plain PyTorch around a DeepSpeed engine.

`train(spec, ctx)` is the whole loop. The context says who this worker is and which Ray session carries its
checkpoints: Ray Train for `run` and `train`, Ray Tune for a one-worker sweep trial. Rank 0 writes the run's
outputs (epoch files with their state cards, metrics.jsonl) to run storage, never to a local folder.
"""
import json
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from rwkvray.files import storage
from rwkvray.files.cache import local_copy, object_size
from rwkvray.spec import TuneSpec, check_model_expectations
from rwkvray.train.checkpoints import report_with_manifest, resume_from_intact
from rwkvray.train.inputs import local_inputs
from rwkvray.train.data import TokenBatcher, eval_batches, load_documents, split_holdout
from rwkvray.train.metrics import RunLogger
from rwkvray.model.long_context import Chunking
from rwkvray.model.rwkv import load_model
from rwkvray.peft import build_peft
from rwkvray.peft.epoch_outputs import write_epoch_outputs
from rwkvray.train.schedule import learning_rate
from rwkvray.model.state_card import base_fingerprint, card_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


class WorkerContext:
    """Who this worker is, and the Ray session (ray.train or ray.tune) its checkpoints go through."""

    def __init__(self, session, rank: int, world_size: int, device: torch.device, manifest_last: bool = True):
        self.session, self.rank, self.world_size, self.device = session, rank, world_size, device
        self.manifest_last = manifest_last  # Ray Train: written into the stored checkpoint after every upload

    @classmethod
    def ray_train_worker(cls) -> "WorkerContext":
        import ray.train
        import ray.train.torch
        context = ray.train.get_context()
        return cls(ray.train, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())

    @classmethod
    def tune_trial(cls, use_gpu: bool) -> "WorkerContext":
        """A one-worker trial runs in the trial's process, in a process group of its own (DeepSpeed needs one)."""
        import ray.tune
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        _join_single_process_group(device)
        return cls(ray.tune, 0, 1, device, manifest_last=False)

    def resume(self, load) -> None:
        resume_from_intact(self.session, self.rank, load)

    def report(self, metrics: dict, checkpoint_dir: str) -> None:
        report_with_manifest(self.session, self.rank, metrics, checkpoint_dir, self.manifest_last)


def _join_single_process_group(device: torch.device) -> None:
    import socket
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


@dataclass
class Progress:
    step: int = 0           # optimizer steps done (the data position: batch n is drawn from the seed and n)
    best_val_loss: float | None = None


def train(spec, ctx) -> dict:
    """Run the spec's training on this worker; returns the last metrics."""
    _quiet_library_logs()
    spec = local_inputs(spec)  # URIs: this node's cached copies
    trainer = spec.trainer
    torch.manual_seed(trainer.seed)
    if trainer.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    module = _build_module(spec, ctx.device)
    train_docs, val_docs = _load_data(spec)
    batcher = TokenBatcher(train_docs, spec.data.ctx_len, seed=trainer.seed,
                           first_only=spec.data.dataload != "pieces")
    engine = _build_engine(spec, module, ctx)
    engine.module.train()  # adapter dropout on; the frozen base has no dropout of its own
    progress = Progress()
    ctx.resume(lambda folder: _load_checkpoint(folder, engine, progress, ctx.rank))

    total = trainer.epoch_count * trainer.epoch_steps
    logger = RunLogger(storage.run_dir(spec), total, progress.step, enabled=ctx.rank == 0,
                       wandb_project=spec.logging.wandb_project, wandb_mode=spec.logging.wandb_mode,
                       wandb_dir=spec.trainer.proj_dir, run_name=spec.run.name, config=spec.model_dump(mode="json"))
    metrics = {}
    while progress.step < total:
        metrics = _train_step(spec, engine, batcher, progress, ctx)
        progress.step += 1
        report = _report_due(spec, progress.step)
        if report and val_docs:
            metrics["val_loss"] = evaluate(engine, val_docs, spec.data.ctx_len, spec.trainer.micro_bsz, ctx)
        logger.log_step(**metrics, report_follows=report)
        if report:
            _checkpoint_and_report(spec, engine, progress, metrics, ctx, logger)
    logger.finish()
    return metrics


def _quiet_library_logs() -> None:
    """One line per report, from rank 0 (ours): not Ray Train's per-worker checkpoint and report logs, nor the
    FutureWarning torch prints at each DeepSpeed call of a renamed collective."""
    import logging
    import sys
    import warnings
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    report_module = sys.modules.get("ray.train.v2._internal.execution.context")  # its logger is named by file
    if report_module is not None:
        logging.getLogger(report_module.__file__).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def _build_module(spec, device):
    model, _ = load_model(spec.model.path, device=device, dtype=DTYPES[spec.trainer.precision],
                          op=spec.trainer.op, grad_cp=spec.trainer.grad_cp)
    check_model_expectations(spec.model, model.dims, spec.source)
    trainer = spec.trainer
    chunking = Chunking(trainer.chunk_ctx, trainer.chunk_grad == "detached") if trainer.chunk_ctx else None
    return build_peft(model, spec.peft, chunking)


def _load_data(spec):
    data = spec.data
    docs = documents_of(data, data.file)
    if data.eval_file:
        return docs, documents_of(data, data.eval_file)  # validated as the same type
    if data.holdout_fraction > 0:
        return split_holdout(docs, data.holdout_fraction, spec.trainer.seed)
    return docs, []


def documents_of(data, path):
    return load_documents(path, data.type, data.loss_mask, markers=(data.mask_id.mask0, data.mask_id.mask1),
                          sft_split=data.sft_split, sft_field=data.sft_field)


def _build_engine(spec, module, ctx):
    """Every world size, one worker included, runs the spec's DeepSpeed config: no setting is dropped. The one
    exception is trainer.cuda_graph (one GPU worker, checked in the spec): DeepSpeed's step cannot be captured."""
    if spec.trainer.cuda_graph:
        from rwkvray.train.graphed_engine import GraphedEngine
        return GraphedEngine(module, spec.optim, spec.trainer.micro_bsz, spec.data.ctx_len, ctx.device)
    from rwkvray.train.deepspeed_config import deepspeed_config
    from rwkvray.train.deepspeed_engine import DeepSpeedEngine, cpu_comm_op_missing
    if ctx.rank == 0 and ctx.device.type == "cpu" and cpu_comm_op_missing():
        print("building DeepSpeed's CPU communication op (once per machine: about a minute, needs a C++ compiler)",
              flush=True)
    return DeepSpeedEngine(module, spec.optim, deepspeed_config(spec))


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
    loss = _sum_over_ranks([loss_sum / trainer.grad_accum], ctx)[0] / ctx.world_size
    tokens_per_s = tokens * ctx.world_size / (time.perf_counter() - start)
    return {"step": progress.step + 1, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}


def _sum_over_ranks(values: list[float], ctx) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)  # nccl reduces only GPU tensors
    torch.distributed.all_reduce(t)
    return t.tolist()


def _report_due(spec, step: int) -> bool:
    """Evaluate, checkpoint and report at every epoch end, every run.checkpoint_every_steps and every
    tune.eval_every_steps. Every rank reports at the same steps: under Ray Train a report is a barrier."""
    sweep_every = spec.tune.eval_every_steps if isinstance(spec, TuneSpec) else None
    periods = [spec.trainer.epoch_steps, spec.run.checkpoint_every_steps, sweep_every]
    return any(p and step % p == 0 for p in periods)


@torch.no_grad()
def evaluate(engine, docs, ctx_len: int, micro_bsz: int, ctx) -> float:
    """Token-weighted mean loss over every held-out piece: each rank takes every world_size-th batch, then the
    sums are all-reduced. Ranks run the same number of forwards (ZeRO-3 gathers weights in each one): a rank
    past the end repeats batch 0 with weight 0."""
    batches = list(eval_batches(docs, ctx_len, micro_bsz))
    total, count = 0.0, 0.0
    engine.module.eval()
    for index in range(ctx.rank, ctx.rank + ctx.world_size * -(-len(batches) // ctx.world_size), ctx.world_size):
        batch = batches[index] if index < len(batches) else batches[0]
        n = batch.mask.sum().item() if index < len(batches) else 0.0
        total += engine(*(t.to(ctx.device) for t in (batch.input_ids, batch.targets, batch.mask))).item() * n
        count += n
    engine.module.train()
    total, count = _sum_over_ranks([total, count], ctx)
    return total / max(count, 1.0)


def _checkpoint_and_report(spec, engine, progress, metrics, ctx, logger) -> None:
    if "val_loss" in metrics:
        best = progress.best_val_loss
        progress.best_val_loss = metrics["val_loss"] if best is None else min(metrics["val_loss"], best)
        metrics["best_val_loss"] = progress.best_val_loss
    epoch_end = progress.step % spec.trainer.epoch_steps == 0
    with tempfile.TemporaryDirectory() as folder:
        engine.save(folder)
        torch.save(_rng_state(), os.path.join(folder, f"rng-{ctx.rank}.pt"))  # adapter dropout continues the same
        with engine.gathered():  # ZeRO-3 partitions the trainable tensors: gather them on every rank
            if ctx.rank == 0:
                _save_progress(folder, engine, progress)
                if epoch_end:
                    _save_epoch_files(spec, engine, progress.step // spec.trainer.epoch_steps, metrics, logger)
                logger.save_metrics()
                logger.note(report_line(metrics, spec.trainer.epoch_count * spec.trainer.epoch_steps))
        ctx.report(metrics, folder)


def report_line(metrics: dict, total: int) -> str:
    line = f"step {metrics['step']}/{total}: loss {metrics['loss']:.4f}"
    if "val_loss" in metrics:
        line += f", val_loss {metrics['val_loss']:.4f}"
    return line + ", checkpoint saved"


def _save_epoch_files(spec, engine, epoch: int, metrics: dict, logger) -> None:
    """rwkv-<epoch>.pth (and its card) every epoch_save epochs and after the last one, numbered from 0 as
    RWKV-PEFT does, written to run storage."""
    trainer = spec.trainer
    if epoch % trainer.epoch_save and epoch != trainer.epoch_count:
        return
    for method in engine.module.methods:
        name = f"{method.file_prefix}-{epoch - 1}"
        with tempfile.TemporaryDirectory() as scratch:
            method.save(os.path.join(scratch, name + ".pth"))
            with open(os.path.join(scratch, name + ".pth"), "rb") as f:
                storage.write_bytes(storage.join(storage.run_dir(spec), name + ".pth"), f.read())
        card = state_card(spec, engine.module.base.dims, method.name, metrics)
        storage.write_bytes(storage.join(storage.run_dir(spec), name + ".json"), card_bytes(card))
        logger.note(f"saved {name}.pth")
    _save_epoch_extras(spec, engine, epoch)


def _save_epoch_extras(spec, engine, epoch: int) -> None:
    """RWKV-PEFT's per-epoch extras (merged model, peft folder `adapter/`, init_pissa.pth), made in scratch as
    they go in run storage, then stored."""
    files = {method.name: method.file_tensors() for method in engine.module.methods}
    with tempfile.TemporaryDirectory() as scratch:
        write_epoch_outputs(spec.peft, spec.model.path, scratch, os.path.join(scratch, "adapter"), files, epoch - 1,
                            lambda _: None)
        for folder, _, names in os.walk(scratch):
            for name in names:
                local = os.path.join(folder, name)
                where = os.path.relpath(local, scratch).split(os.sep)
                with open(local, "rb") as f:
                    storage.write_bytes(storage.join(storage.run_dir(spec), *where), f.read())


def state_card(spec, dims, method: str, metrics: dict) -> dict:
    from rwkvray import __version__
    if method == "state" and spec.peft.state.shift:
        method = "fullstate"  # the file holds the token-shift starts too
    return {"base": base_fingerprint(local_copy(spec.model.path), dims), "method": method,  # the driver's: a URI
            "data": {"file": os.path.basename(spec.data.file or "dummy"), "size": _data_size(spec.data)},
            "steps": metrics.get("step"), "loss": metrics.get("loss"), "val_loss": metrics.get("val_loss"),
            "rwkvray_version": __version__}


def _data_size(data) -> int:
    path = data.file + ".bin" if data.type == "binidx" else data.file
    if storage.is_uri(data.file or ""):
        return object_size(path)
    if data.type == "dummy" or os.path.isdir(data.file):  # no file, or an sft save_to_disk folder
        return 0
    return os.path.getsize(path)


def _save_progress(folder, engine, progress) -> None:
    for method in engine.module.methods:
        method.save(os.path.join(folder, f"{method.name}.pth"))
    with open(os.path.join(folder, "progress.json"), "w") as f:
        json.dump({"step": progress.step, "best_val_loss": progress.best_val_loss}, f)


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
