"""The `rwkvray` command. Each subcommand parses its flags and hands off to the module that does the work."""
import argparse
import contextlib
import signal
import sys
import threading

from rwkvray import __version__
from rwkvray.errors import UserError


def cmd_init_model(args) -> None:
    import torch
    from rwkvray.model.checkpoint import save_checkpoint
    from rwkvray.model.init import default_dims, default_dims_x060, init_weights
    make_dims = default_dims_x060 if args.version == "x060" else default_dims
    dims = make_dims(args.n_layer, args.n_embd, args.vocab_size, args.head_size)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    save_checkpoint(init_weights(dims, seed=args.seed, perturb=args.perturb, dtype=dtype), args.out)
    if args.version == "x060":
        low_rank = f"ffn {dims.dim_ffn}, low-rank mix/decay {dims.dim_mix}/{dims.dim_decay}"
    else:
        low_rank = f"low-rank w/a/v/g {dims.dim_w}/{dims.dim_a}/{dims.dim_v}/{dims.dim_g}"
    print(f"wrote {args.out}: {dims.version}, n_layer {dims.n_layer}, n_embd {dims.n_embd}, "
          f"vocab {dims.vocab_size}, {low_rank}")


def warn_on_foreign_base(state_path: str, model_path: str) -> None:
    from rwkvray.model.state_card import base_mismatch, read_card
    try:
        mismatch = base_mismatch(read_card(state_path), model_path)
    except ValueError as err:
        mismatch = f"its card is unreadable ({err})"
    if mismatch:
        print(f"warning: {state_path}: {mismatch}", file=sys.stderr)


def cmd_generate(args) -> None:
    import torch
    from rwkvray.text.generate import generate_tokens
    from rwkvray.model.rwkv import load_model, pick_device
    from rwkvray.model.state_file import load_state
    from rwkvray.model.tuned_state import TunedState
    from rwkvray.text.tokenizer import StreamDecoder, get_tokenizer
    if not args.prompt:
        raise UserError("--prompt: must not be empty")
    device = pick_device(args.device)
    model, merged_state = load_model(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.state:
        tuned = load_state(args.state, model.dims)
    else:
        tuned = None if merged_state is None else TunedState(merged_state)
    if args.state:
        warn_on_foreign_base(args.state, args.model)
    tokenizer = get_tokenizer()
    decoder = StreamDecoder(tokenizer)
    for token in generate_tokens(model, tokenizer.encode(args.prompt), tuned, args.max_tokens,
                                 args.temperature, args.top_p, args.seed):
        print(decoder.feed(token), end="", flush=True)
    print(decoder.flush())


def cmd_train(args) -> None:
    from rwkvray.compat.rwkv_peft import read_train_flags
    flags = read_train_flags(args.flags)  # before importing torch: `train --help` answers at once
    spec = flags.spec()
    flags.warn()
    from rwkvray.launch.run import run_on_ray
    from rwkvray.launch.prechecks import before_training
    before_training(spec)
    run_on_ray(spec)  # --devices 1 too: one worker, the same engine and loop


def cmd_convert_flags(args) -> None:
    from rwkvray.compat.rwkv_peft import read_train_flags
    from rwkvray.compat.to_yaml import spec_yaml
    flags = read_train_flags(args.flags, prog="rwkvray convert-flags")
    flags.spec()  # refuse what `rwkvray run` would refuse
    flags.warn()
    print(spec_yaml(flags, args.flags), end="")


def cmd_validate(args) -> None:
    from rwkvray.launch.prechecks import validate_file
    print(validate_file(args.spec, check_files=args.check_files))


def load_with_flags(args, kind):
    """The spec file as the command's kind, with what the command's flags override."""
    from rwkvray.spec import load_spec
    spec = load_spec(args.spec, kind=kind)
    if args.wandb_mode:
        spec = spec.model_copy(update={"logging": spec.logging.model_copy(update={"wandb_mode": args.wandb_mode})})
    return spec


def cmd_run(args) -> None:
    from rwkvray.spec import TrainSpec
    from rwkvray.launch.run import run_on_ray
    from rwkvray.launch.prechecks import before_training
    spec = load_with_flags(args, TrainSpec)  # a tune spec trains too, with its own values
    before_training(spec, address=args.address)
    run_on_ray(spec, address=args.address, allow_changed_spec=args.allow_changed_spec)


def cmd_tune(args) -> None:
    from rwkvray.spec import TuneSpec
    from rwkvray.launch.tune import run_sweep
    from rwkvray.launch.prechecks import before_training
    spec = load_with_flags(args, TuneSpec)
    before_training(spec, tune=True, address=args.address)
    run_sweep(spec, address=args.address, allow_changed_spec=args.allow_changed_spec)


def cmd_serve(args) -> None:
    from rwkvray.spec import ServeSpec, load_spec
    spec = load_spec(args.spec, kind=ServeSpec)  # before importing Ray Serve, which takes seconds
    from rwkvray.launch.prechecks import before_serving
    from rwkvray.launch.serving import run_server
    before_serving(spec, args.address)
    run_server(spec, address=args.address)


def cmd_eval(args) -> None:
    from rwkvray.launch.evaluate import eval_command
    eval_command(args)


def cmd_merge_state(args) -> None:
    from rwkvray.model.state_file import merge_state
    merge_state(args.base, args.state, args.out)
    print(f"wrote {args.out}")


def cmd_export_state(args) -> None:
    from rwkvray.model.state_file import export_state
    export_state(args.state, args.out, args.format)
    print(f"wrote {args.out}")


def cmd_merge(args) -> None:
    from rwkvray.peft.merge import merge_adapter
    merged = merge_adapter(args.type, args.base, args.adapter, args.out, args.dtype, args.lora_alpha, args.init)
    print(f"wrote {args.out}: {len(merged)} weights merged")


def cmd_publish(args) -> None:
    import os
    from rwkvray.files.publish import publish_state
    from rwkvray.model.state_card import card_path, read_card
    from rwkvray.model.state_file import load_state
    path = os.path.join(args.source, "rwkv-final.pth") if os.path.isdir(args.source) else args.source
    load_state(path)  # a state file, or one line saying what it is not
    try:
        card = read_card(path)
    except ValueError as err:
        raise UserError(str(err)) from None
    with open(path, "rb") as f:
        state = f.read()
    card_bytes = None
    if card is not None:
        with open(card_path(path), "rb") as f:
            card_bytes = f.read()
    print(publish_state(state, card_bytes, args.states_dir, args.name, args.replace, "add --replace"))


def cmd_prepare_data(args) -> None:
    from rwkvray.launch.prepare_data import prepare_data
    print(prepare_data(args.inputs, args.out, args.address, args.shuffle_seed, args.num_cpus, args.overwrite))


def cmd_cache(args) -> None:
    from rwkvray.files import cache
    if args.action == "clear":
        removed, freed = cache.clear()
        print(f"removed {removed} cache entr{'y' if removed == 1 else 'ies'} ({freed / 1e6:.1f} MB) from "
              f"{cache.cache_dir()}")
        return
    found = cache.entries()
    if not found:
        print(f"{cache.cache_dir()}: no downloads cached (set {cache.CACHE_ENV} to use another folder)")
    for entry in found:
        print(f"{entry['uri']}\t{entry['size'] / 1e6:.1f} MB\t{entry['path']}")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its description, where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if shown and "default" not in text:
            text += f" (default: {action.default})"
        return text


def add_command(sub, name: str, func, text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvray", description="State tuning of RWKV-7 models on Ray.")
    parser.add_argument("--version", action="version", version=f"rwkvray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_command(sub, "init-model", cmd_init_model,
                    "write a new RWKV-7 (or RWKV-6) checkpoint with the RWKV-LM init")
    p.add_argument("--version", choices=["x070", "x060"], default="x070", help="RWKV-7 (x070) or RWKV-6 (x060)")
    p.add_argument("--n-layer", type=int, required=True, help="number of blocks")
    p.add_argument("--n-embd", type=int, required=True, help="embedding width (a multiple of --head-size)")
    p.add_argument("--vocab-size", type=int, default=65536,
                   help="vocabulary size (the RWKV world tokenizer has 65536 tokens)")
    p.add_argument("--head-size", type=int, default=64, help="channels per head")
    p.add_argument("--seed", type=int, default=0, help="random seed of the init")
    p.add_argument("--perturb", type=float, default=0.0,
                   help="noise std for the zero-initialised matrices: a fresh init ignores any state (demos, tests)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the saved weights")
    p.add_argument("--out", required=True, metavar="PTH", help="checkpoint file to write")

    p = add_command(sub, "generate", cmd_generate, "RNN-mode generation, optionally from a tuned state")
    p.add_argument("--model", required=True, metavar="PTH", help="RWKV-7 checkpoint")
    p.add_argument("--state", metavar="PTH", help="tuned state file to start from, fullstate too "
                   "(default: the model's own)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when there is one)")

    sub.add_parser("train", add_help=False, help="train with RWKV-PEFT's train.py flags (rwkvray train --help)")
    sub.add_parser("convert-flags", add_help=False,
                   help="print the YAML job spec for RWKV-PEFT's train.py flags (the flags of rwkvray train)")

    p = add_command(sub, "validate", cmd_validate,
                    "check a job spec (or a Ray Serve config file) without starting anything")
    p.add_argument("spec", help="job spec YAML file")
    p.add_argument("--no-check-files", dest="check_files", action="store_false",
                   help="do not look for the spec's files (model, data) here: they live on the cluster")

    for name, func, text in (("run", cmd_run, "run a job spec on Ray Train (DeepSpeed workers)"),
                             ("tune", cmd_tune, "sweep learning rates with Ray Tune"),
                             ("serve", cmd_serve, "serve the base model and mounted states (Ray Serve)")):
        p = add_command(sub, name, func, text)
        p.add_argument("spec", help="job spec YAML file")
        p.add_argument("--address", metavar="HOST:PORT",
                       help="Ray head to join (default: $RAY_ADDRESS, else a local Ray instance)")
        if name in ("run", "tune"):
            p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"],
                           help="W&B logging mode, instead of the spec's logging.wandb_mode")
            p.add_argument("--allow-changed-spec", action="store_true",
                           help=f"resume a {'run' if name == 'run' else 'sweep'} whose spec changed since it "
                                "started (default: refuse)")

    p = add_command(sub, "publish", cmd_publish, "put a tuned state, with its card, into a Serve states_dir by name")
    p.add_argument("source", metavar="RUN_OR_STATE",
                   help="a run's folder (its rwkv-final.pth) or a state file; its card NAME.json goes with it")
    p.add_argument("--states-dir", required=True, metavar="DIR",
                   help="the Serve spec's serve.states_dir (a folder, or an s3:// URI)")
    p.add_argument("--name", required=True, help="the name requests give as `model`")
    p.add_argument("--replace", action="store_true",
                   help="replace a different state of that name (it is kept as NAME.prev.pth; default: refuse)")

    p = add_command(sub, "prepare-data", cmd_prepare_data,
                    "tokenize jsonl files into an RWKV-LM binidx pair (.bin + .idx), in parallel on Ray Data")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help='jsonl files or folders of them (local, s3:// or gs://): {"text": ...} or chat '
                        '{"messages": [...]} lines, one document each')
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx (local, s3:// or gs://); data.type binidx reads them")
    p.add_argument("--shuffle-seed", type=int, metavar="N",
                   help="shuffle the documents with this seed (default: input order, as RWKV-LM's make_data.py "
                        "writes one epoch)")
    p.add_argument("--num-cpus", type=int, metavar="N",
                   help="CPUs that tokenize (default: every CPU of the local instance or the cluster)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin and PREFIX.idx")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="Ray head to join (default: $RAY_ADDRESS, else a local Ray instance)")

    p = add_command(sub, "cache", cmd_cache, "list or clear this node's downloads of s3:// and gs:// inputs "
                    "($RWKVRAY_CACHE_DIR, default ~/.cache/rwkvray)")
    p.add_argument("action", choices=["ls", "clear"], help="ls: each cached object's URI, size and local path; "
                   "clear: remove them all")

    p = add_command(sub, "eval", cmd_eval, "score the base model and tuned states on eval rows (jsonl), on Ray")
    add_eval_flags(p)

    p = add_command(sub, "merge-state", cmd_merge_state, "put a state into a base checkpoint file")
    p.add_argument("--base", required=True, metavar="PTH", help="RWKV-7 checkpoint")
    p.add_argument("--state", required=True, metavar="PTH", help="state file (blocks.{i}.att.time_state; "
                   "a fullstate file is refused: a model file has no place for its token shifts)")
    p.add_argument("--out", required=True, metavar="PTH", help="checkpoint file to write")

    p = add_command(sub, "export-state", cmd_export_state, "convert a state file (safetensors for Ai00)")
    p.add_argument("--state", required=True, metavar="PTH", help="state file written by training")
    p.add_argument("--format", choices=["safetensors"], default="safetensors",
                   help="output format (safetensors: fp16, [key, value] layout, as Ai00 reads it)")
    p.add_argument("--out", required=True, help="file to write")

    p = add_command(sub, "merge", cmd_merge, "fold a LoRA, PiSSA or DiSHA adapter into a full BlinkDL checkpoint")
    p.add_argument("--type", choices=["lora", "pissa", "disha"], help="the adapter's method (default: told by the adapter)")
    p.add_argument("--base", required=True, metavar="PTH", help="the base checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter file written by training, or a peft save_pretrained folder")
    p.add_argument("--init", metavar="PTH", help="PiSSA's init_pissa.pth, for RWKV-PEFT's PiSSA files (ours carry it)")
    p.add_argument("--out", required=True, metavar="PTH", help="checkpoint file to write")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="cast every tensor (default: keep the base's dtypes)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha, for RWKV-PEFT LoRA files (ours store it)")
    return parser


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    from rwkvray.eval.job import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS
    p.add_argument("spec", nargs="?", help="a spec with model and eval blocks, instead of the flags below")
    p.add_argument("--model", metavar="PTH", help="the base checkpoint (always scored, as state base)")
    p.add_argument("--state", action="append", default=[], metavar="NAME=PATH",
                   help="a state to score: a state file or a run folder (its rwkv-final.pth); repeatable")
    p.add_argument("--data", action="append", default=[], metavar="FILE.jsonl",
                   help="eval rows: multiple choice, generation, text or chat; repeatable")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="greedy tokens per generation row")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="sequences per forward, and generation rows decoded together")
    p.add_argument("--out", metavar="JSON", help="results file (a PNG bar chart is written beside it)")
    p.add_argument("--details", metavar="JSONL", help="one row per item and state")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="Ray head to join (default: $RAY_ADDRESS, else a local Ray instance)")


def interrupted_line(argv: list[str], word: str = "interrupted") -> str:
    """What Ctrl-C (or SIGTERM: `word` "terminated") leaves: training commands resume from their last checkpoint
    when run again."""
    import shlex
    if argv[:1] in (["run"], ["tune"], ["train"]):
        return f"{word}; resume with: rwkvray {shlex.join(argv)}"
    return word


@contextlib.contextmanager
def ctrl_c_interrupts():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt while a command runs, even when the process started with SIGINT
    ignored, as a shell starts its background jobs: `kill -INT` then stops a run resumably, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flag_commands = {"train": cmd_train, "convert-flags": cmd_convert_flags}
    if argv[:1] and argv[0] in flag_commands:  # RWKV-PEFT's flags go to their own parser (argparse's REMAINDER can't)
        args = argparse.Namespace(func=flag_commands[argv[0]], flags=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        with ctrl_c_interrupts():
            args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        from rwkvray.launch.ray_session import Terminated
        if isinstance(stop, Terminated):
            print(interrupted_line(argv, "terminated"), file=sys.stderr)
            return 128 + signal.SIGTERM
        print(interrupted_line(argv), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
