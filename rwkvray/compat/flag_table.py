"""RWKV-PEFT's train.py flags, one row each: the flag, the spec key it sets and the conversion of its value.

A row without a key is a flag that changes nothing here. Given on the command line it is warned about once,
with the reason; a value that asks for something rwkvray does not do is refused instead (its conversion says
why). The rows also carry what `rwkvray train --help` shows, group by group, common flags first.
"""

from __future__ import annotations

import json
from argparse import ArgumentTypeError
from dataclasses import dataclass, field
from typing import Any, Callable

from rwkvray.compat import conversions as c
from rwkvray.compat import peft_flags as p
from rwkvray.compat.spec_api import TrainSpec, nested_model


@dataclass(frozen=True)
class Flag:
    name: str  # without the dashes
    help: str
    key: str | tuple[str, ...] | None = None  # dotted spec key(s); "optim.betas[0]" is an item of a list
    convert: Callable | None = None  # (value, flags, name) -> spec value(s) or c.SKIP; None: the value as is
    ignored: str | None = None  # for a flag without a key: why it changes nothing here
    always: bool = False  # converted even when not given (the conversion finds the value)
    aliases: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # argparse's type, action, nargs, metavar


def spec_default(path: str) -> str:
    """' (default: X)' with X the spec's default for the dotted key `path`."""
    model: Any = TrainSpec
    *blocks, key = path.split(".")
    for block in blocks:
        model = nested_model(model.model_fields[block].annotation)
    value = model.model_fields[key].get_default(call_default_factory=True)
    return f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text}") from None
    if not isinstance(value, dict):
        raise ArgumentTypeError(f"must be a JSON object like '{{\"r\": 8}}': {text}")
    return value


def to(name: str, key, help: str, kind=str, convert=None, **options) -> Flag:
    """A flag that sets `key`, with the spec's default shown when `key` is one spec value that has a default."""
    plain = isinstance(key, str) and "." in key and "[" not in key and "default" not in help
    shown = spec_default(key) if plain and not spec_default(key).endswith("None)") else ""
    return Flag(name, help + shown, key, convert, options={"type": kind, **options})


def switch(name: str, key, help: str, convert) -> Flag:
    return Flag(name, help, key, convert, options={"action": "store_true"})


def ignored(name: str, kind, why: str, **options) -> Flag:
    return Flag(name, f"no effect here: {why}", ignored=why, options={"type": kind, **options})


def expected(name: str, accepted: tuple, why: str) -> Flag:
    shown = ", ".join(map(str, accepted))
    return Flag(name, f"only {shown} (no effect: {why})", ignored=why, convert=c.must_be(accepted, why),
                options={"type": type(accepted[0])})


PEFT_METHOD = ("peft.method", "peft.combine_state")
NOT_READ = "RWKV-PEFT declares it, but none of its models reads it"
PILE = "an RWKV-LM pile pretraining setting, read only with --my_pile_stage above 0"
LOADER = "a DataLoader setting, and each Ray worker makes its batches in its own process"

GROUPS: dict[str, list[Flag]] = {
    "common flags": [
        Flag("load_model", "base RWKV-7 checkpoint", "model.path", aliases=("model",), options={"metavar": "PTH"}),
        Flag("data_file", ".jsonl file or binidx prefix", "data.file", aliases=("data",), options={"metavar": "PATH"}),
        Flag("proj_dir", "local copy of the state/adapter files; without --storage_path the run's checkpoints go to "
             "<proj_dir>/<--name> too (default: ./runs/<--name>)", ("trainer.proj_dir", "run.storage_path"),
             c.proj_dir, options={"metavar": "DIR"}),
        Flag("peft", "state, lora, pissa, disha (miss and bone are DiSHA's other names)" + spec_default("peft.method"),
             PEFT_METHOD, p.peft_method),
        to("ctx_len", "data.ctx_len", "tokens per sample", int),
        to("micro_bsz", "trainer.micro_bsz", "samples per step and device", int),
        to("epoch_steps", "trainer.epoch_steps", "steps per epoch", int),
        to("epoch_count", "trainer.epoch_count", "epochs", int),
        to("epoch_save", "trainer.epoch_save", "save a state file every N epochs", int),
        to("lr_init", "optim.lr_init", "learning rate at the start", float),
        to("lr_final", "optim.lr_final", "learning rate at the end", float),
        Flag("accelerator", "gpu or cpu (default: gpu if this machine has a CUDA device, else cpu)",
             "scaling.use_gpu", c.accelerator, always=True),
        to("devices", "scaling.num_workers", "workers per node; above 1 they run on Ray Train (default: 1)", int,
           c.worker_count),
        to("precision", "trainer.precision", "bf16, fp16, fp32 or tf32"),
    ],
    "model and data": [
        Flag("data_type", "jsonl or binidx (default: from the file name)", "data.type", c.data_type, always=True),
        to("loss_mask", "data.loss_mask", "none, pad (same as none: padding never counts) or qa (default: none)",
           convert=c.loss_mask),
        Flag("dataload", "pad or only (no effect: rwkvray samples whole-document pieces)", ignored=c.DATALOAD_WHY,
             convert=c.dataload),
        to("vocab_size", "model.vocab_size", "checked against the checkpoint (default and 0: not checked)", int,
           c.zero_means_auto),
        to("n_layer", "model.n_layer", "checked against the checkpoint (default: not checked)", int),
        to("n_embd", "model.n_embd", "checked against the checkpoint (default: not checked)", int),
        Flag("head_size_a", "checked against the checkpoint (default: not checked)", "model.head_size",
             aliases=("head_size",), options={"type": int}),
        to("dim_att", "model.n_embd", "0 or --n_embd (default: 0)", int, c.dim_att),
        to("my_testing", "model.version", "model version, x070 (RWKV-7) or x060 (RWKV-6): checked against the "
           "checkpoint, whose keys decide (default: the checkpoint's)", convert=c.lowercase),
    ],
    "schedule and optimizer": [
        to("warmup_steps", "optim.warmup_steps", "linear warm-up steps; negative means 0", int, c.negative_means_zero),
        to("lr_schedule", "optim.schedule", "cos_decay (or cos) or wsd", convert=c.lr_schedule),
        to("beta1", "optim.betas[0]", "AdamW beta1 (default: 0.9)", float),
        to("beta2", "optim.betas[1]", "AdamW beta2 (default: 0.99)", float),
        to("adam_eps", "optim.eps", "AdamW epsilon", float),
        to("weight_decay", "optim.weight_decay", "AdamW weight decay", float),
        to("grad_cp", "trainer.grad_cp", "1: recompute activations in the backward pass (default: 0)", int,
           c.zero_or_one),
        to("random_seed", "trainer.seed", "negative: keep the default seed (rwkvray always seeds)", int,
           c.negative_means_default),
        to("wandb", ("logging.wandb_project", "logging.wandb_mode"), "W&B project name ('' for none) (default: none)",
           convert=c.wandb_project),
    ],
    "PEFT": [
        to("train_type", PEFT_METHOD, "state: tune the state (alone, or with the --peft weight method)",
           convert=p.peft_method),
        *(to(name, "peft", "the method's settings as JSON, e.g. '{\"r\": 8}'", json_object, p.adapter_settings,
             metavar="JSON") for name in p.ALL_CONFIG_FLAGS),
        to("quant", "peft.quant", "quantize the frozen base: none, int8 or nf4", convert=c.lowercase),
        switch("fla", "trainer.op", "same as --op fla", c.fla_switch),
        to("op", "trainer.op", "WKV kernel: auto, torch, cuda, fla (triton is taken as fla)", convert=c.kernel),
        to("train_parts", "peft.train_parts", "ln: train the LayerNorms with the adapter (nothing else) "
           "(default: none)", convert=p.train_parts, nargs="*"),
        to("merge", "peft.merge", "1: also write the merged model rwkv-N.pth each saved epoch; "
           "0: also write the peft folder <proj_dir>-adapter/ (default: 1)", int, c.zero_or_one),
        switch("lora", PEFT_METHOD, "old form of --peft lora", p.peft_method),
        switch("PISSA", PEFT_METHOD, "old form of --peft pissa", p.peft_method),
        switch("state_tune", PEFT_METHOD, "old form of --train_type state", p.peft_method),
        to("lora_r", "peft", "old form of --lora_config '{\"r\": N}'", int, p.adapter_settings),
        to("lora_alpha", "peft", "old form of --lora_config '{\"alpha\": X}'", float, p.adapter_settings),
        to("lora_dropout", "peft", "old form of --lora_config '{\"dropout\": X}'", float, p.adapter_settings),
        to("lora_parts", "peft", "modules to adapt: att, ffn (comma separated)", convert=p.adapter_settings),
        to("lora_load", "peft", "must be empty: starting from saved adapter weights is not supported",
           convert=p.adapter_settings),
        to("svd_niter", "peft", "PiSSA's SVD iterations" + spec_default("peft.pissa.svd_niter"), int,
           p.adapter_settings),
    ],
    "hardware (Lightning flags, mapped to Ray workers and DeepSpeed)": [
        to("num_nodes", "scaling.num_workers", "nodes; Ray workers = devices x num_nodes (default: 1)", int,
           c.worker_count),
        to("strategy", ("deepspeed.stage", "deepspeed.offload"), "deepspeed_stage_1/2/3[_offload], deepspeed or ddp "
           "(default: deepspeed_stage_1)", convert=c.strategy),
        to("accumulate_grad_batches", "trainer.grad_accum", "micro-batches per optimizer step", int),
    ],
    "rwkvray only": [
        Flag("action", "the seed form: --action train --data FILE --model FILE", options={"choices": ["train"]}),
        to("name", "run.name", "run name (Ray Train run folder; rerun with it to resume)"),
        to("storage_path", "run.storage_path", "Ray Train storage: local/shared folder or s3:// URI "
           "(default: ./runs)"),
        to("eval_file", "data.eval_file", "evaluation data (same type as --data_file)"),
        to("holdout_fraction", "data.holdout_fraction", "hold out this fraction of the data for evaluation", float),
        to("state_init", "peft.state.init_from", "state file to start state tuning from (default: zeros)"),
        to("grad_clip", "optim.grad_clip", "gradient clipping, 0 for none", float),
        to("max_failures", "run.max_failures", "worker-group restarts on failure (-1: forever)", int),
        to("checkpoint_every_steps", "run.checkpoint_every_steps",
           "also checkpoint every N steps (default: at each --epoch_save epoch)", int),
        to("keep_checkpoints", "run.keep_checkpoints", "Ray Train checkpoints kept", int),
        to("placement_strategy", "scaling.placement_strategy", "PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"),
        to("wandb_mode", "logging.wandb_mode", "online (default with --wandb), offline or disabled"),
    ],
    "RWKV-PEFT flags that change nothing here (a warning names each one given)": [
        *(ignored(name, int, NOT_READ) for name in ("pre_ffn", "head_qk", "tiny_att_dim", "tiny_att_layer",
                                                      "my_pos_emb", "my_ffn_shift", "my_att_shift", "load_partial")),
        ignored("dim_ffn", int, "the FFN width is the checkpoint's"),
        ignored("dropout", float, "RWKV-PEFT's RWKV-6/7 models read no dropout (LoRA's is in --lora_config)"),
        *(ignored(name, int, PILE) for name in ("my_pile_version", "my_pile_shift", "my_pile_edecay", "magic_prime",
                                                  "my_sample_len", "my_random_steps", "my_exit_tokens")),
        ignored("layerwise_lr", int, "it scales the learning rate of time_* and *_w1/_w2 weights, which PEFT "
                "keeps frozen"),
        ignored("ds_bucket_mb", int, "DeepSpeed keeps its own bucket sizes (a job spec sets them in deepspeed.config)"),
        ignored("chunk_ctx", int, "read only by --train_type infctx, which rwkvray does not offer"),
        ignored("sft_split", str, "read only for --data_type sft, which rwkvray does not offer"),
        ignored("sft_field", str, "read only for --data_type sft, which rwkvray does not offer", nargs="+"),
        ignored("mask_id", json_object, "read only by --loss_mask se, which rwkvray does not offer"),
        *(ignored(name, int, LOADER) for name in ("num_workers", "prefetch_factor")),
        Flag("persistent_workers", f"no effect here: {LOADER}", ignored=LOADER, options={"action": "store_true"}),
        ignored("avg_loss", int, "rwkvray logs every step's loss to metrics.jsonl"),
        Flag("fused_kernel", "no effect here: the kernel follows --op", ignored="the kernel follows --op",
             options={"action": "store_true"}),
        expected("epoch_begin", (0,), "rwkvray resumes from its own checkpoints: rerun with the same --name instead"),
        expected("my_pile_stage", (0,), "RWKV-LM pile pretraining stages are not supported"),
        expected("data_shuffle", (1,), "rwkvray always draws batches at random (seeded by --random_seed)"),
        expected("my_qa_mask", (0,), "use --loss_mask qa"),
        expected("head_size_divisor", (8,), "RWKV-7 fixes it at 8 (ln_x eps 64e-5)"),
        expected("optim", ("none",), "rwkvray uses AdamW"),
        expected("optimizer", ("none",), "rwkvray uses AdamW"),
        Flag("my_exit", "must not stop before --epoch_count epochs (no effect otherwise)",
             ignored="rwkvray trains --epoch_count epochs", convert=c.my_exit, options={"type": int}),
        Flag("weight_decay_final", "must be ≤ 0 (no effect: weight decay stays at --weight_decay)",
             ignored="weight decay stays at --weight_decay", convert=c.weight_decay_final, options={"type": float}),
    ],
}
ROWS: list[Flag] = [flag for group in GROUPS.values() for flag in group]
