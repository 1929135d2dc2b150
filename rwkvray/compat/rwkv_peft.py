"""`rwkvray train`: RWKV-PEFT's `train.py` flags, with their names and meanings, turned into a JobSpec.

`python train.py --load_model M --data_file D --peft state ...` becomes `rwkvray train --load_model M ...`.
Every flag of RWKV-PEFT's train.py (JL-er/RWKV-PEFT and its successor) is accepted:
- flags that mean something here are mapped into the spec (--lora_config, --strategy, --devices, ...);
- --n_layer, --n_embd, --head_size_a and --vocab_size become expectations checked against the checkpoint;
- flags that RWKV-PEFT itself ignores for RWKV-7 (x070) are accepted whatever their value;
- a value we cannot honour (--my_testing x052, --train_type infctx, --quant fp8, ...) is a one-line error.
The seed form `--action train --data FILE --model FILE` works too.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rwkvray.spec import TARGETS, TrainSpec, nested_model, spec_from_dict, strategy_to_deepspeed
from rwkvray.errors import UserError

SOURCE = "train flags"
MODEL_VERSIONS = ("x070", "x060")
WEIGHT_METHODS = {"lora": "lora", "pissa": "pissa", "disha": "disha", "miss": "disha", "bone": "disha"}
CONFIG_FLAGS = {  # method -> flags that may carry its JSON config
    "lora": ("lora_config", "peft_config"),
    "pissa": ("pissa_config", "peft_config"),
    "disha": ("disha_config", "miss_config", "bone_config", "peft_config"),
}
CONFIG_KEYS = {  # method -> {RWKV-PEFT JSON key: our key}
    "lora": {"r": "r", "lora_r": "r", "alpha": "alpha", "lora_alpha": "alpha", "dropout": "dropout",
             "lora_dropout": "dropout", "target_modules": "targets", "lora_parts": "targets"},
    "pissa": {"r": "r", "pissa_r": "r", "lora_r": "r", "svd_niter": "svd_niter", "target_modules": "targets"},
    "disha": {"r": "r", "bone_r": "r", "mode": "mode", "bone_mode": "mode", "target_modules": "targets"},
}
LOAD_KEYS = ("load", "lora_load", "pissa_load", "pissa_init", "bone_load")  # adapter weights to start from
LEGACY_ADAPTER_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_parts", "lora_load", "svd_niter")
IGNORED_FOR_X070 = (  # RWKV-PEFT reads these only for RWKV-5/6, pile pretraining or infctx
    ("pre_ffn", int), ("head_qk", int), ("tiny_att_dim", int), ("tiny_att_layer", int), ("dim_ffn", int),
    ("dropout", float), ("my_pile_version", int), ("my_pile_shift", int), ("my_pile_edecay", int),
    ("magic_prime", int), ("layerwise_lr", int), ("ds_bucket_mb", int), ("my_sample_len", int),
    ("my_ffn_shift", int), ("my_att_shift", int), ("my_pos_emb", int), ("load_partial", int),
    ("my_random_steps", int), ("my_exit_tokens", int), ("chunk_ctx", int), ("sft_split", str),
)
NO_EFFECT_HERE = {  # flag -> (type, why it changes nothing on Ray)
    "num_workers": (int, "DataLoader workers: each Ray worker builds its own batches"),
    "prefetch_factor": (int, "DataLoader prefetching: each Ray worker builds its own batches"),
    "avg_loss": (int, "loss logging style"),
}
REQUIRED_VALUES = {  # flag -> (the values we can honour, why another value cannot be)
    "epoch_begin": ({0}, "rwkvray resumes from its own checkpoints: rerun with the same --name instead"),
    "my_pile_stage": ({0}, "RWKV-LM pile pretraining stages are not supported"),
    "data_shuffle": ({1}, "rwkvray always draws batches at random (seeded by --random_seed)"),
    "my_qa_mask": ({0}, "use --loss_mask qa"),
    "head_size_divisor": ({8}, "RWKV-7 fixes it at 8 (ln_x eps 64e-5)"),
    "optim": ({"none"}, "rwkvray uses AdamW"),
    "optimizer": ({"none"}, "rwkvray uses AdamW"),
}
TRAIN_PARTS_REFUSED = {  # --train_parts value -> why not
    "time": "RWKV-7 has no time_* parameters, so RWKV-PEFT trains nothing for it either (use ln, or drop it)",
    "emb": "training the embedding is full fine-tuning of it (use ln)",
    "head": "training the head is full fine-tuning of it (use ln)",
}
UNSUPPORTED_PEFT = {  # --peft value today's RWKV-PEFT hands to Hugging Face peft -> what to use instead
    "adalora": "use --peft lora (AdaLoRA is LoRA whose ranks are pruned during training)",
    "prefix": "use --peft state (state tuning is RWKV's prefix tuning: a learned initial state)",
}
ALWAYS_NAMED = {"model.path": "--load_model", "data.file": "--data_file"}


class FlagParser(argparse.ArgumentParser):
    """Argparse that reports a bad flag as a one-line UserError instead of usage text and exit 2."""

    def error(self, message: str):
        raise UserError(f"{SOURCE}: {message}")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"r\": 8}}': {text}")
    return value


def build_train_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="rwkvray train",
        usage="rwkvray train --load_model PTH --data_file PATH [--proj_dir DIR] [FLAG VALUE ...]",
        description="Train with RWKV-PEFT's train.py flags (same names, same meanings), on Ray.",
        allow_abbrev=False,
    )
    add_common_flags(parser.add_argument_group("common flags"))
    add_main_flags(parser.add_argument_group("model and data"))
    add_schedule_flags(parser.add_argument_group("schedule and optimizer"))
    add_peft_flags(parser.add_argument_group("PEFT"))
    add_hardware_flags(parser.add_argument_group("hardware (Lightning flags, mapped to Ray workers and DeepSpeed)"))
    add_rwkvray_flags(parser.add_argument_group("rwkvray only"))
    add_compat_flags(parser.add_argument_group("RWKV-PEFT flags kept for compatibility"))
    return parser


def spec_default(path: str) -> str:
    """' (default: X)' with X the job spec's default for the dotted key `path`."""
    model: Any = TrainSpec
    *blocks, key = path.split(".")
    for block in blocks:
        model = nested_model(model.model_fields[block].annotation)
    value = model.model_fields[key].get_default(call_default_factory=True)
    return f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"


def add_common_flags(group) -> None:
    group.add_argument("--load_model", "--model", dest="load_model", metavar="PTH", help="base RWKV-7 checkpoint")
    group.add_argument("--data_file", "--data", dest="data_file", metavar="PATH", help=".jsonl file or binidx prefix")
    group.add_argument("--proj_dir", metavar="DIR",
                       help="local copy of the state/adapter files; without --storage_path the run's checkpoints go to "
                       "<proj_dir>/<--name> too (default: ./runs/<--name>)")
    group.add_argument("--peft", help="state, lora, pissa, disha (miss and bone are DiSHA's other names)"
                       + spec_default("peft.method"))
    group.add_argument("--ctx_len", type=int, help="tokens per sample" + spec_default("data.ctx_len"))
    group.add_argument("--micro_bsz", type=int, help="samples per step and device" + spec_default("trainer.micro_bsz"))
    group.add_argument("--epoch_steps", type=int, help="steps per epoch" + spec_default("trainer.epoch_steps"))
    group.add_argument("--epoch_count", type=int, help="epochs" + spec_default("trainer.epoch_count"))
    group.add_argument("--epoch_save", type=int,
                       help="save a state file every N epochs" + spec_default("trainer.epoch_save"))
    group.add_argument("--lr_init", type=float, help="learning rate at the start" + spec_default("optim.lr_init"))
    group.add_argument("--lr_final", type=float, help="learning rate at the end" + spec_default("optim.lr_final"))
    group.add_argument("--accelerator", help="gpu or cpu (default: gpu if this machine has a CUDA device, else cpu)")
    group.add_argument("--devices", type=int, help="workers per node; above 1 they run on Ray Train (default: 1)")
    group.add_argument("--precision", help="bf16, fp16, fp32 or tf32" + spec_default("trainer.precision"))


def add_main_flags(group) -> None:
    group.add_argument("--data_type", help="jsonl or binidx (default: from the file name)")
    group.add_argument("--loss_mask", help="none, pad (same as none: padding never counts) or qa (default: none)")
    group.add_argument("--dataload", help="pad or only (rwkvray samples whole-document pieces) (default: pad)")
    group.add_argument("--vocab_size", type=int, help="checked against the checkpoint (default and 0: not checked)")
    group.add_argument("--n_layer", type=int, help="checked against the checkpoint (default: not checked)")
    group.add_argument("--n_embd", type=int, help="checked against the checkpoint (default: not checked)")
    group.add_argument("--head_size_a", "--head_size", dest="head_size_a", type=int,
                       help="checked against the checkpoint (default: not checked)")
    group.add_argument("--dim_att", type=int, help="0 or --n_embd (default: 0)")
    group.add_argument("--my_testing", help="model version, x070 (RWKV-7) or x060 (RWKV-6): checked against the "
                       "checkpoint, whose keys decide (default: the checkpoint's)")


def add_schedule_flags(group) -> None:
    group.add_argument("--warmup_steps", type=int,
                       help="linear warm-up steps; negative means 0" + spec_default("optim.warmup_steps"))
    group.add_argument("--lr_schedule", help="cos_decay (or cos) or wsd" + spec_default("optim.schedule"))
    group.add_argument("--beta1", type=float, help="AdamW beta1 (default: 0.9)")
    group.add_argument("--beta2", type=float, help="AdamW beta2 (default: 0.99)")
    group.add_argument("--adam_eps", type=float, help="AdamW epsilon" + spec_default("optim.eps"))
    group.add_argument("--weight_decay", type=float, help="AdamW weight decay" + spec_default("optim.weight_decay"))
    group.add_argument("--grad_cp", type=int, help="1: recompute activations in the backward pass (default: 0)")
    group.add_argument("--random_seed", type=int,
                       help="negative: keep the default seed (rwkvray always seeds)" + spec_default("trainer.seed"))
    group.add_argument("--wandb", help="W&B project name ('' for none) (default: none)")


def add_peft_flags(group) -> None:
    group.add_argument("--train_type", help="state: tune the state (alone, or with the --peft weight method)")
    for name in ("lora_config", "pissa_config", "disha_config", "miss_config", "bone_config", "peft_config"):
        group.add_argument(f"--{name}", type=json_object, metavar="JSON",
                           help="the method's settings as JSON, e.g. '{\"r\": 8}'")
    group.add_argument("--quant", help="quantize the frozen base: none, int8 or nf4" + spec_default("peft.quant"))
    group.add_argument("--fla", action="store_true", help="same as --op fla")
    group.add_argument("--op", help="WKV kernel: auto, torch, cuda, fla (triton is taken as fla)"
                       + spec_default("trainer.op"))
    group.add_argument("--train_parts", nargs="*", help="ln: train the LayerNorms with the adapter (nothing else) "
                       "(default: none)")
    group.add_argument("--merge", type=int, help="1: also write the merged model rwkv-N.pth each saved epoch; "
                       "0: also write the peft folder <proj_dir>-adapter/ (default: 1)")
    group.add_argument("--lora", action="store_true", help="old form of --peft lora")
    group.add_argument("--PISSA", action="store_true", help="old form of --peft pissa")
    group.add_argument("--state_tune", action="store_true", help="old form of --train_type state")
    group.add_argument("--lora_r", type=int, help="old form of --lora_config '{\"r\": N}'")
    group.add_argument("--lora_alpha", type=float, help="old form of --lora_config '{\"alpha\": X}'")
    group.add_argument("--lora_dropout", type=float, help="old form of --lora_config '{\"dropout\": X}'")
    group.add_argument("--lora_parts", help="modules to adapt: att, ffn (comma separated)")
    group.add_argument("--lora_load", help="must be empty: starting from saved adapter weights is not supported")
    group.add_argument("--svd_niter", type=int, help="PiSSA's SVD iterations" + spec_default("peft.pissa.svd_niter"))


def add_hardware_flags(group) -> None:
    group.add_argument("--num_nodes", type=int, help="nodes; Ray workers = devices x num_nodes (default: 1)")
    group.add_argument("--strategy", help="deepspeed_stage_1/2/3[_offload], deepspeed or ddp "
                       "(default: deepspeed_stage_1)")
    group.add_argument("--accumulate_grad_batches", type=int,
                       help="micro-batches per optimizer step" + spec_default("trainer.grad_accum"))


def add_rwkvray_flags(group) -> None:
    group.add_argument("--action", choices=["train"], help="the seed form: --action train --data FILE --model FILE")
    group.add_argument("--name", help="run name (Ray Train run folder; rerun with it to resume)"
                       + spec_default("run.name"))
    group.add_argument("--storage_path", help="Ray Train storage: local/shared folder or s3:// URI (default: ./runs)")
    group.add_argument("--eval_file", help="evaluation data (same type as --data_file)")
    group.add_argument("--holdout_fraction", type=float, help="hold out this fraction of the data for evaluation"
                       + spec_default("data.holdout_fraction"))
    group.add_argument("--state_init", help="state file to start state tuning from (default: zeros)")
    group.add_argument("--grad_clip", type=float,
                       help="gradient clipping, 0 for none" + spec_default("optim.grad_clip"))
    group.add_argument("--max_failures", type=int,
                       help="worker-group restarts on failure (-1: forever)" + spec_default("run.max_failures"))
    group.add_argument("--checkpoint_every_steps", type=int,
                       help="also checkpoint every N steps (default: at each --epoch_save epoch)")
    group.add_argument("--keep_checkpoints", type=int,
                       help="Ray Train checkpoints kept" + spec_default("run.keep_checkpoints"))
    group.add_argument("--placement_strategy", help="PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"
                       + spec_default("scaling.placement_strategy"))
    group.add_argument("--wandb_mode", help="online (default with --wandb), offline or disabled")


def add_compat_flags(group) -> None:
    for name, kind in IGNORED_FOR_X070:
        group.add_argument(f"--{name}", type=kind, help="ignored for RWKV-7, as in RWKV-PEFT")
    for name, (kind, why) in NO_EFFECT_HERE.items():
        group.add_argument(f"--{name}", type=kind, help=f"ignored: {why}")
    for name, (values, _) in REQUIRED_VALUES.items():
        kind = type(next(iter(values)))
        group.add_argument(f"--{name}", type=kind, help=f"accepted value: {', '.join(map(str, sorted(values)))}")
    group.add_argument("--my_exit", type=int, help="must not stop before --epoch_count epochs")
    group.add_argument("--weight_decay_final", type=float, help="must be ≤ 0 (weight decay stays constant)")
    group.add_argument("--mask_id", type=json_object, help="ignored (used only by RWKV-PEFT's se mask)")
    group.add_argument("--sft_field", nargs="+", help="ignored (sft data is not supported)")
    group.add_argument("--fused_kernel", action="store_true", help="ignored (kernel choice follows --op)")
    group.add_argument("--persistent_workers", action="store_true", help="ignored (no DataLoader workers)")


# ---------------------------------------------------------------- flags -> spec


class SpecBuilder:
    """A nested spec dict, plus which flag set each key path (to name flags in error messages)."""

    def __init__(self):
        self.data: dict[str, Any] = {"model": {}, "data": {}}
        self.names: dict[str, str] = dict(ALWAYS_NAMED)

    def put(self, path: str, value: Any, flag: str) -> None:
        *blocks, key = path.split(".")
        node = self.data
        for block in blocks:
            node = node.setdefault(block, {})
        node[key] = value
        self.names[path] = flag

    def put_given(self, path: str, value: Any, flag: str) -> None:
        if value is not None:
            self.put(path, value, flag)


def flag_error(flag: str, message: str) -> UserError:
    return UserError(f"{SOURCE}: --{flag}: {message}")


def spec_from_train_flags(argv: list[str]) -> TrainSpec:
    """The TrainSpec for an RWKV-PEFT style command line; bad flags raise a one-line UserError."""
    args = build_train_parser().parse_args(argv)
    check_compat_flags(args)
    spec = SpecBuilder()
    map_model(args, spec)
    map_data(args, spec)
    map_peft(args, spec)
    map_optim(args, spec)
    map_trainer(args, spec)
    map_hardware(args, spec)
    map_run_and_logging(args, spec)
    return spec_from_dict(spec.data, SOURCE, spec.names)


def check_compat_flags(args) -> None:
    if args.my_testing is not None and args.my_testing.strip().lower() not in MODEL_VERSIONS:
        raise flag_error("my_testing", f"{args.my_testing!r} is not supported; rwkvray trains RWKV-7 (x070) and "
                                       "RWKV-6 (x060)")
    for name, (values, why) in REQUIRED_VALUES.items():
        value = getattr(args, name)
        if value is not None and value not in values:
            raise flag_error(name, f"{value!r} is not supported: {why}")
    if args.weight_decay_final is not None and args.weight_decay_final > 0:
        raise flag_error("weight_decay_final", "decaying weight decay is not supported: it stays at --weight_decay")
    if args.my_exit is not None and args.my_exit + 1 < (args.epoch_count or 1):
        raise flag_error("my_exit", f"would stop after epoch {args.my_exit}: set --epoch_count instead")


def map_model(args, spec: SpecBuilder) -> None:
    spec.put_given("model.path", args.load_model, "--load_model")
    if args.my_testing is not None:
        spec.put("model.version", args.my_testing.strip().lower(), "--my_testing")
    spec.put_given("model.n_layer", args.n_layer, "--n_layer")
    spec.put_given("model.n_embd", args.n_embd, "--n_embd")
    spec.put_given("model.head_size", args.head_size_a, "--head_size_a")
    if args.vocab_size:  # 0 means "auto" in RWKV-PEFT
        spec.put("model.vocab_size", args.vocab_size, "--vocab_size")
    if args.dim_att:
        if args.n_embd is not None and args.dim_att != args.n_embd:
            raise flag_error("dim_att", f"must be 0 or --n_embd ({args.n_embd})")
        spec.put("model.n_embd", args.dim_att, "--dim_att")


def map_data(args, spec: SpecBuilder) -> None:
    spec.put_given("data.file", args.data_file, "--data_file")
    data_type = args.data_type or infer_data_type(args.data_file)
    if data_type not in (None, "jsonl", "binidx"):
        raise flag_error("data_type", f"{data_type!r} is not supported (use jsonl or binidx)")
    spec.put_given("data.type", data_type, "--data_type")
    spec.put_given("data.ctx_len", args.ctx_len, "--ctx_len")
    if args.loss_mask is not None:
        if args.loss_mask not in ("none", "pad", "qa"):
            raise flag_error("loss_mask", f"{args.loss_mask!r} is not supported (use none, pad or qa)")
        spec.put("data.loss_mask", "qa" if args.loss_mask == "qa" else "none", "--loss_mask")
    if args.dataload not in (None, "pad", "only"):
        why = "rwkvray samples pieces of whole documents (like pad)"
        raise flag_error("dataload", f"{args.dataload!r} is not supported: {why}")
    if args.dataload == "only" and (args.micro_bsz or 1) != 1:
        raise flag_error("dataload", "only needs --micro_bsz 1")
    spec.put_given("data.eval_file", args.eval_file, "--eval_file")
    spec.put_given("data.holdout_fraction", args.holdout_fraction, "--holdout_fraction")


def infer_data_type(path: str | None) -> str | None:
    if path is None:
        return None
    if path.endswith(".jsonl"):
        return "jsonl"
    prefix = os.path.splitext(path)[0] if path.endswith((".bin", ".idx")) else path
    if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
        return "binidx"
    why = f"not given, and {path} is neither a .jsonl file nor a binidx prefix: pass --data_type"
    raise flag_error("data_type", why)


def map_peft(args, spec: SpecBuilder) -> None:
    method, combine_state = peft_method(args)
    spec.put("peft.method", method, "--peft")
    if combine_state:
        spec.put("peft.combine_state", True, "--train_type")
    for flag in {f for flags in CONFIG_FLAGS.values() for f in flags} - set(CONFIG_FLAGS.get(method, ())):
        if getattr(args, flag) is not None:
            raise flag_error(flag, f"given, but the method is {method}")
    if method in CONFIG_KEYS:
        map_adapter_config(args, method, spec)
    elif any(getattr(args, f) is not None for f in LEGACY_ADAPTER_FLAGS):
        flag = next(f for f in LEGACY_ADAPTER_FLAGS if getattr(args, f) is not None)
        raise flag_error(flag, "given, but the method is state")
    if args.quant is not None:
        if args.quant.lower() not in ("none", "int8", "nf4"):
            raise flag_error("quant", f"{args.quant!r} is not supported (use int8 or nf4)")
        spec.put("peft.quant", args.quant.lower(), "--quant")
    spec.put_given("peft.state.init_from", args.state_init, "--state_init")
    map_merge_and_train_parts(args, spec)


def map_merge_and_train_parts(args, spec: SpecBuilder) -> None:
    if args.merge is not None:
        if args.merge not in (0, 1):
            raise flag_error("merge", f"must be 0 or 1 (got {args.merge})")
        spec.put("peft.merge", bool(args.merge), "--merge")
    for part in args.train_parts or ():
        if part != "ln":
            raise flag_error("train_parts", f"{part!r} is not supported: {TRAIN_PARTS_REFUSED.get(part, 'only ln is')}")
    if args.train_parts:
        spec.put("peft.train_parts", ["ln"], "--train_parts")


def peft_method(args) -> tuple[str, bool]:
    """(method, combine_state) from --peft, --train_type and the old --lora/--PISSA/--state_tune switches."""
    peft = (args.peft or "none").lower()
    if peft in UNSUPPORTED_PEFT:
        raise flag_error("peft", f"{args.peft!r} is not supported: {UNSUPPORTED_PEFT[peft]}")
    if peft not in ("none", "state", *WEIGHT_METHODS):
        raise flag_error("peft", f"{args.peft!r} is not supported (use state, lora, pissa or disha)")
    train_type = (args.train_type or "none").lower()
    if train_type not in ("none", "state", "states"):
        raise flag_error("train_type", f"{args.train_type!r} is not supported (use state, or leave it out)")
    weight = WEIGHT_METHODS.get(peft) or ("lora" if args.lora else "pissa" if args.PISSA else None)
    state = peft == "state" or train_type != "none" or args.state_tune
    if weight is None and not state and args.peft is not None:
        raise flag_error("peft", "full fine-tuning is not supported: use --peft state, lora, pissa or disha")
    return (weight, state) if weight else ("state", False)  # no --peft at all: state tuning, rwkvray's default


def map_adapter_config(args, method: str, spec: SpecBuilder) -> None:
    given = [f for f in CONFIG_FLAGS[method] if getattr(args, f) is not None]
    if len(given) > 1:
        raise flag_error(given[1], f"give the {method} settings once (--{given[0]} is given too)")
    entries = [(f"--{given[0]} {key}", key, value) for key, value in getattr(args, given[0]).items()] if given else []
    for flag in LEGACY_ADAPTER_FLAGS:
        if getattr(args, flag) is not None:
            if any(key == flag for _, key, _ in entries):
                raise flag_error(flag, f"also given in --{given[0]}")
            entries.append((f"--{flag}", flag, getattr(args, flag)))
    for where, key, value in entries:
        if key in LOAD_KEYS:
            if value:
                why = "starting from saved adapter weights is not supported (rerun with the same --name to resume)"
                raise UserError(f"{SOURCE}: {where}: {why}")
            continue
        if key not in CONFIG_KEYS[method]:
            raise UserError(f"{SOURCE}: {where}: unknown key for {method} (use {', '.join(CONFIG_KEYS[method])})")
        ours = CONFIG_KEYS[method][key]
        spec.put(f"peft.{method}.{ours}", expand_targets(value, where) if ours == "targets" else value, where)


def expand_targets(names: Any, where: str) -> list[str]:
    """RWKV-PEFT target names (att, ffn, key, att.key, ...) as our module names, in our order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{SOURCE}: {where}: must be a list of module names")
    chosen = set()
    for name in names:
        matches = [t for t in TARGETS if name in (t, t.split(".")[0], t.split(".")[1])]
        if not matches:
            why = f"{name!r} is not a module rwkvray adapts (use {', '.join(TARGETS)}, att or ffn)"
            raise UserError(f"{SOURCE}: {where}: {why}")
        chosen.update(matches)
    return [t for t in TARGETS if t in chosen]


def map_optim(args, spec: SpecBuilder) -> None:
    spec.put_given("optim.lr_init", args.lr_init, "--lr_init")
    spec.put_given("optim.lr_final", args.lr_final, "--lr_final")
    if args.warmup_steps is not None:
        spec.put("optim.warmup_steps", max(args.warmup_steps, 0), "--warmup_steps")
    if args.lr_schedule is not None:
        spec.put("optim.schedule", {"cos": "cos_decay"}.get(args.lr_schedule, args.lr_schedule), "--lr_schedule")
    if args.beta1 is not None or args.beta2 is not None:
        betas = [0.9 if args.beta1 is None else args.beta1, 0.99 if args.beta2 is None else args.beta2]
        spec.put("optim.betas", betas, "--beta1/--beta2")
        spec.names.update({"optim.betas[0]": "--beta1", "optim.betas[1]": "--beta2"})
    spec.put_given("optim.eps", args.adam_eps, "--adam_eps")
    spec.put_given("optim.weight_decay", args.weight_decay, "--weight_decay")
    spec.put_given("optim.grad_clip", args.grad_clip, "--grad_clip")


def map_trainer(args, spec: SpecBuilder) -> None:
    same_meaning = {"epoch_steps": "epoch_steps", "epoch_count": "epoch_count", "epoch_save": "epoch_save",
                    "micro_bsz": "micro_bsz", "accumulate_grad_batches": "grad_accum", "precision": "precision"}
    for flag, key in same_meaning.items():
        spec.put_given(f"trainer.{key}", getattr(args, flag), f"--{flag}")
    if args.grad_cp is not None:
        if args.grad_cp not in (0, 1):
            raise flag_error("grad_cp", f"must be 0 or 1 (got {args.grad_cp})")
        spec.put("trainer.grad_cp", bool(args.grad_cp), "--grad_cp")
    op = "fla" if args.fla and args.op is None else args.op
    if op is not None:
        spec.put("trainer.op", "fla" if op == "triton" else op, "--fla" if args.fla and args.op is None else "--op")
    if args.random_seed is not None and args.random_seed >= 0:
        spec.put("trainer.seed", args.random_seed, "--random_seed")
    spec.put_given("trainer.proj_dir", args.proj_dir, "--proj_dir")


def map_hardware(args, spec: SpecBuilder) -> None:
    accelerator = (args.accelerator or machine_accelerator()).lower()
    if accelerator not in ("gpu", "cuda", "cpu"):
        raise flag_error("accelerator", f"{args.accelerator!r} is not supported (use gpu or cpu)")
    if accelerator == "cpu":
        check_cpu_flags(args)
    spec.put("scaling.use_gpu", accelerator != "cpu", "--accelerator")
    for flag in ("devices", "num_nodes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise flag_error(flag, f"must be ≥ 1 (got {getattr(args, flag)})")
    spec.put("scaling.num_workers", (args.devices or 1) * (args.num_nodes or 1), "--devices × --num_nodes")
    spec.put_given("scaling.placement_strategy", args.placement_strategy, "--placement_strategy")
    if args.strategy is not None:
        try:
            stage, offload = strategy_to_deepspeed(args.strategy)
        except UserError as e:
            raise flag_error("strategy", str(e)) from None
        spec.put("deepspeed.stage", stage, "--strategy")
        spec.put("deepspeed.offload", offload, "--strategy")


def machine_accelerator() -> str:
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def check_cpu_flags(args) -> None:
    """GPU-only choices, refused in the flags' own words (the spec's checks would name spec keys)."""
    cpu = "--accelerator cpu" if args.accelerator else "--accelerator cpu (the default here: no CUDA device)"
    op = "fla" if args.fla and args.op is None else args.op
    if op in ("cuda", "fla", "triton"):
        raise flag_error("fla" if args.fla and args.op is None else "op",
                         f"{op} needs a GPU, but the run is on {cpu}: use --op torch, or --accelerator gpu")
    if args.precision == "fp16":
        raise flag_error("precision", f"fp16 needs a GPU, but the run is on {cpu}: use --precision bf16 or fp32")
    if args.strategy and args.strategy.endswith("_offload"):
        raise flag_error("strategy", f"{args.strategy} moves the optimizer to CPU memory, where it already is on "
                         f"{cpu}: use {args.strategy.removesuffix('_offload')}")


def map_run_and_logging(args, spec: SpecBuilder) -> None:
    spec.put_given("run.name", args.name, "--name")
    if args.storage_path is None and args.proj_dir is not None:  # checkpoints in <proj_dir>/<name>, not ./runs
        spec.put("run.storage_path", args.proj_dir, "--proj_dir")
    spec.put_given("run.storage_path", args.storage_path, "--storage_path")
    spec.put_given("run.max_failures", args.max_failures, "--max_failures")
    spec.put_given("run.checkpoint_every_steps", args.checkpoint_every_steps, "--checkpoint_every_steps")
    spec.put_given("run.keep_checkpoints", args.keep_checkpoints, "--keep_checkpoints")
    if args.wandb:  # RWKV-PEFT logs online whenever a project is named
        spec.put("logging.wandb_project", args.wandb, "--wandb")
        spec.put("logging.wandb_mode", "online", "--wandb")
    spec.put_given("logging.wandb_mode", args.wandb_mode, "--wandb_mode")
