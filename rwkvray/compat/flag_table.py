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

from rwkvray.compat import conversions as to_spec
from rwkvray.compat import peft_flags as peft_to_spec
from rwkvray.compat.spec_api import default_of


@dataclass(frozen=True)
class Flag:
    name: str  # without the dashes
    help: str
    key: str | tuple[str, ...] | None = None  # dotted spec key(s); "optim.betas[0]" is an item of a list
    convert: Callable | None = None  # (value, flags, name) -> spec value(s) or SKIP; None: the value as is
    ignored: str | None = None  # for a flag without a key: why it changes nothing here
    always: bool = False  # converted even when not given (the conversion finds the value)
    aliases: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # argparse's type, action, nargs, metavar


def spec_default(path: str) -> str:
    """' (default: X)' with X the spec's default for the dotted key `path`."""
    value = default_of(path)
    return f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text}") from None
    if not isinstance(value, dict):
        raise ArgumentTypeError(f"must be a JSON object like '{{\"r\": 8}}': {text}")
    return value


def sets(name: str, key, help: str, kind=str, convert=None, **options) -> Flag:
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
    return Flag(name, f"only {shown} (no effect: {why})", ignored=why, convert=to_spec.must_be(accepted, why),
                options={"type": type(accepted[0])})


PEFT_METHOD = ("peft.method", "peft.combine_state", "peft.state.shift")
ADAPTER = peft_to_spec.adapter_settings  # the method's block, from its JSON config and the old --lora_* flags
NOT_READ = "RWKV-PEFT declares it, but none of its models reads it"
PILE = "an RWKV-LM pile pretraining setting, read only with --my_pile_stage above 0"
LOADER = "a DataLoader setting, and each Ray worker makes its batches in its own process"

GROUPS: dict[str, list[Flag]] = {
    "common flags": [
        Flag("load_model", "base RWKV-7 checkpoint", "model.path", aliases=("model",), options={"metavar": "PTH"}),
        Flag("data_file", "the --data_type's file (a binidx prefix; for sft also a save_to_disk folder; none for "
             "dummy)", "data.file", aliases=("data",), options={"metavar": "PATH"}),
        Flag("proj_dir", "local copy of the state/adapter files; without --storage_path the run's checkpoints go to "
             "<proj_dir>/<--name> too (default: ./runs/<--name>)", ("trainer.proj_dir", "run.storage_path"),
             to_spec.proj_dir, options={"metavar": "DIR"}),
        Flag("peft", "state, lora, pissa, disha (miss and bone are DiSHA's other names)" + spec_default("peft.method"),
             PEFT_METHOD, peft_to_spec.peft_method),
        sets("ctx_len", "data.ctx_len", "tokens per sample", int),
        sets("micro_bsz", "trainer.micro_bsz", "samples per step and device", int),
        sets("epoch_steps", "trainer.epoch_steps", "steps per epoch", int),
        sets("epoch_count", "trainer.epoch_count", "epochs", int),
        sets("epoch_save", "trainer.epoch_save", "save a state file every N epochs", int),
        sets("lr_init", "optim.lr_init", "learning rate at the start", float),
        sets("lr_final", "optim.lr_final", "learning rate at the end", float),
        Flag("accelerator", "gpu or cpu (default: gpu if this machine has a CUDA device, else cpu)",
             "scaling.use_gpu", to_spec.accelerator, always=True),
        sets("devices", "scaling.num_workers", "workers per node; above 1 they run on Ray Train (default: 1)", int,
             to_spec.worker_count),
        sets("precision", "trainer.precision", "bf16, fp16, fp32 or tf32"),
    ],
    "model and data": [
        Flag("data_type", "jsonl, binidx, sft (a Hugging Face dataset), utf-8 or utf-16le (text), numpy (.npy "
             "token ids), uint16 (raw token file) or dummy (synthetic) (default: jsonl, numpy or binidx from the "
             "file name, else utf-8)", "data.type", to_spec.data_type, always=True),
        sets("loss_mask", "data.loss_mask", "none, pad (same as none: padding never counts), qa (jsonl chats: the "
             "replies) or se (from each --mask_id mask1 text to the next mask0 text) (default: none)",
             convert=to_spec.loss_mask),
        sets("mask_id", "data.mask_id", "--loss_mask se: the texts that turn the loss off and on; read only "
             "with se, like RWKV-PEFT (default: '{\"mask0\": \"0\", \"mask1\": \"1\"}')", json_object,
             to_spec.mask_id, metavar="JSON"),
        sets("dataload", "data.dataload", "pad: each document's first --ctx_len tokens, padded; only: the same, one "
             "document per sample (--micro_bsz 1) (default: every --ctx_len piece of every document)",
             convert=to_spec.dataload),
        sets("sft_field", "data.sft_field", "sft: the instruction and response columns (default: query response)",
             nargs="+", metavar="COLUMN"),
        sets("sft_split", "data.sft_split", "sft: the split, e.g. train or train[:1000]"),
        sets("vocab_size", "model.vocab_size", "checked against the checkpoint (default and 0: not checked)", int,
             to_spec.zero_means_auto),
        sets("n_layer", "model.n_layer", "checked against the checkpoint (default: not checked)", int),
        sets("n_embd", "model.n_embd", "checked against the checkpoint (default: not checked)", int),
        Flag("head_size_a", "checked against the checkpoint (default: not checked)", "model.head_size",
             aliases=("head_size",), options={"type": int}),
        sets("dim_att", "model.n_embd", "0 or --n_embd (default: 0)", int, to_spec.dim_att),
        sets("my_testing", "model.version", "model version, x070 (RWKV-7) or x060 (RWKV-6): checked against the "
             "checkpoint, whose keys decide (default: the checkpoint's)", convert=to_spec.lowercase),
    ],
    "schedule and optimizer": [
        sets("warmup_steps", "optim.warmup_steps", "linear warm-up steps; negative means 0", int,
             to_spec.negative_means_zero),
        sets("lr_schedule", "optim.schedule", "cos_decay (or cos) or wsd", convert=to_spec.lr_schedule),
        sets("beta1", "optim.betas[0]", "AdamW beta1 (default: 0.9)", float),
        sets("beta2", "optim.betas[1]", "AdamW beta2 (default: 0.99)", float),
        sets("adam_eps", "optim.eps", "AdamW epsilon", float),
        sets("weight_decay", "optim.weight_decay", "AdamW weight decay", float),
        sets("grad_cp", "trainer.grad_cp", "1: recompute activations in the backward pass (default: 0)", int,
             to_spec.zero_or_one),
        sets("random_seed", "trainer.seed", "negative: keep the default seed (rwkvray always seeds)", int,
             to_spec.negative_means_default),
        sets("wandb", ("logging.wandb_project", "logging.wandb_mode"), "W&B project name ('' for none) (default: none)",
             convert=to_spec.wandb_project),
    ],
    "PEFT": [
        sets("train_type", PEFT_METHOD, "state: tune the state (alone, or with the --peft weight method); "
             "fullstate: also where the token shifts start (ts_state), with or without --peft state; infctx: long documents, each --ctx_len sample in --chunk_ctx chunks with the state passed on (tunes "
             "the state unless --peft names a weight method)", convert=peft_to_spec.peft_method),
        Flag("chunk_ctx", "--train_type infctx: tokens per chunk, ≤ --ctx_len; the gradient flows through the "
             "chunks back to the tuned state, each chunk recomputed in backward (--chunk_grad detached stops it at "
             "each chunk, as RWKV-PEFT) (default: 512, or --ctx_len if shorter)", "trainer.chunk_ctx",
             peft_to_spec.chunk_ctx, always=True, options={"type": int}),
        *(sets(name, "peft", "the method's settings as JSON, e.g. '{\"r\": 8}'", json_object, ADAPTER,
             metavar="JSON") for name in peft_to_spec.ALL_CONFIG_FLAGS),
        sets("quant", "peft.quant", "quantize the frozen base: none, int8 or nf4", convert=to_spec.lowercase),
        switch("fla", "trainer.op", "same as --op fla", to_spec.fla_switch),
        sets("op", "trainer.op", "WKV kernel: auto, torch, cuda, fla (triton is taken as fla)", convert=to_spec.kernel),
        sets("train_parts", "peft.train_parts", "ln: train the LayerNorms with the adapter (nothing else) "
             "(default: none)", convert=peft_to_spec.train_parts, nargs="*"),
        sets("merge", "peft.merge", "1: also write the merged model rwkv-N.pth each saved epoch; "
             "0: also write the peft folder <proj_dir>-adapter/ (default: 1)", int, to_spec.zero_or_one),
        switch("lora", PEFT_METHOD, "old form of --peft lora", peft_to_spec.peft_method),
        switch("PISSA", PEFT_METHOD, "old form of --peft pissa", peft_to_spec.peft_method),
        switch("state_tune", PEFT_METHOD, "old form of --train_type state", peft_to_spec.peft_method),
        sets("lora_r", "peft", "old form of --lora_config '{\"r\": N}'", int, ADAPTER),
        sets("lora_alpha", "peft", "old form of --lora_config '{\"alpha\": X}'", float, ADAPTER),
        sets("lora_dropout", "peft", "old form of --lora_config '{\"dropout\": X}'", float, ADAPTER),
        sets("lora_parts", "peft", "modules to adapt: att, ffn (comma separated)", convert=ADAPTER),
        sets("lora_load", "peft", "must be empty: starting from saved adapter weights is not supported",
             convert=ADAPTER),
        sets("svd_niter", "peft", "PiSSA's SVD iterations" + spec_default("peft.pissa.svd_niter"), int,
             ADAPTER),
    ],
    "hardware (Lightning flags, mapped to Ray workers and DeepSpeed)": [
        sets("num_nodes", "scaling.num_workers", "nodes; Ray workers = devices x num_nodes (default: 1)", int,
             to_spec.worker_count),
        sets("strategy", ("deepspeed.stage", "deepspeed.offload"), "deepspeed_stage_1/2/3[_offload], deepspeed or ddp "
             "(default: deepspeed_stage_1)", convert=to_spec.strategy),
        sets("accumulate_grad_batches", "trainer.grad_accum", "micro-batches per optimizer step", int),
    ],
    "rwkvray only": [
        Flag("action", "the seed form: --action train --data FILE --model FILE", options={"choices": ["train"]}),
        sets("name", "run.name", "run name (Ray Train run folder; rerun with it to resume)"),
        sets("storage_path", "run.storage_path", "Ray Train storage: local/shared folder or s3:// URI "
             "(default: ./runs)"),
        sets("eval_file", "data.eval_file", "evaluation data (same type as --data_file)"),
        sets("holdout_fraction", "data.holdout_fraction", "hold out this fraction of the data for evaluation", float),
        sets("chunk_grad", "trainer.chunk_grad", "--train_type infctx: through (the gradient reaches the tuned "
             "state from every chunk) or detached (RWKV-PEFT's: only from the first chunk)"),
        sets("state_init", "peft.state.init_from", "state file to start state tuning from (default: zeros)"),
        sets("grad_clip", "optim.grad_clip", "gradient clipping, 0 for none", float),
        sets("max_failures", "run.max_failures", "worker-group restarts on failure (-1: forever)", int),
        sets("checkpoint_every_steps", "run.checkpoint_every_steps",
             "also checkpoint every N steps (default: at each epoch end only)", int),
        sets("keep_checkpoints", "run.keep_checkpoints", "Ray Train checkpoints kept", int),
        sets("placement_strategy", "scaling.placement_strategy", "PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"),
        sets("wandb_mode", "logging.wandb_mode", "online (default with --wandb), offline or disabled"),
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
             ignored="rwkvray trains --epoch_count epochs", convert=to_spec.my_exit, options={"type": int}),
        Flag("weight_decay_final", "must be ≤ 0 (no effect: weight decay stays at --weight_decay)",
             ignored="weight decay stays at --weight_decay", convert=to_spec.weight_decay_final,
             options={"type": float}),
    ],
}
ROWS: list[Flag] = [flag for group in GROUPS.values() for flag in group]
