"""The `rwkvray` command. Each subcommand parses its flags and hands off to the module that does the work."""
import argparse
import os
import sys

from rwkvray.errors import UserError


def cmd_init_model(args) -> None:
    import torch
    from rwkvray.checkpoint import save_checkpoint
    from rwkvray.init_model import default_dims, default_dims_x060, init_weights
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
    from rwkvray.state_card import base_mismatch, read_card
    try:
        mismatch = base_mismatch(read_card(state_path), model_path)
    except ValueError as err:
        mismatch = f"its card is unreadable ({err})"
    if mismatch:
        print(f"warning: {state_path}: {mismatch}", file=sys.stderr)


def cmd_generate(args) -> None:
    import torch
    from rwkvray.generate import generate_tokens
    from rwkvray.model import load_model, pick_device
    from rwkvray.state_file import load_state
    from rwkvray.tokenizer import StreamDecoder, get_tokenizer
    if not args.prompt:
        raise UserError("--prompt: must not be empty")
    device = pick_device(args.device)
    model, merged_state = load_model(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    time_state = load_state(args.state, model.dims) if args.state else merged_state
    if args.state:
        warn_on_foreign_base(args.state, args.model)
    tokenizer = get_tokenizer()
    decoder = StreamDecoder(tokenizer)
    for token in generate_tokens(model, tokenizer.encode(args.prompt), time_state, args.max_tokens,
                                 args.temperature, args.top_p, args.seed):
        print(decoder.feed(token), end="", flush=True)
    print(decoder.flush())


def cmd_train(args) -> None:
    from rwkvray.launch.train import run_on_ray
    from rwkvray.peft_flags import spec_from_train_flags
    run_on_ray(spec_from_train_flags(args.flags))  # --devices 1 too: one worker, the same engine and loop


def cmd_validate(args) -> None:
    from rwkvray.config import load_spec
    spec = load_spec(args.spec)
    print(f"{args.spec}: ok ({', '.join(name for name in type(spec).model_fields if getattr(spec, name) is not None)})")


def cmd_run(args) -> None:
    from rwkvray.config import load_spec
    from rwkvray.launch.train import run_on_ray
    run_on_ray(load_spec(args.spec), address=args.address, allow_changed_spec=args.allow_changed_spec)


def cmd_tune(args) -> None:
    from rwkvray.config import load_spec
    from rwkvray.launch.tune import run_sweep
    run_sweep(load_spec(args.spec), address=args.address)


def cmd_serve(args) -> None:
    from rwkvray.config import load_spec
    from rwkvray.serve.app import run_server
    run_server(load_spec(args.spec), address=args.address)


def cmd_merge_state(args) -> None:
    from rwkvray.state_file import merge_state
    merge_state(args.base, args.state, args.out)
    print(f"wrote {args.out}")


def cmd_export_state(args) -> None:
    from rwkvray.state_file import export_state
    export_state(args.state, args.out, args.format)
    print(f"wrote {args.out}")


def cmd_merge(args) -> None:
    from rwkvray.merge import merge_adapter
    merged = merge_adapter(args.type, args.base, args.adapter, args.out, args.dtype, args.lora_alpha, args.init)
    print(f"wrote {args.out}: {len(merged)} weights merged")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvray", description="State tuning of RWKV-7 models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="write a new RWKV-7 (or RWKV-6) checkpoint with the RWKV-LM init")
    p.add_argument("--version", choices=["x070", "x060"], default="x070", help="RWKV-7 (x070) or RWKV-6 (x060)")
    p.add_argument("--n-layer", type=int, required=True)
    p.add_argument("--n-embd", type=int, required=True)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, default=0.0,
                   help="noise std for the zero-initialised matrices: a fresh init ignores any state (demos, tests)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("generate", help="RNN-mode generation, optionally from a tuned state")
    p.add_argument("--model", required=True)
    p.add_argument("--state")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", add_help=False, help="RWKV-PEFT's train.py flags (rwkvray train --help)")
    p.add_argument("flags", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a job spec without running it")
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    for name, func, text in (("run", cmd_run, "run a job spec on Ray Train (DeepSpeed workers)"),
                             ("tune", cmd_tune, "sweep learning rates with Ray Tune"),
                             ("serve", cmd_serve, "serve the base model and mounted states (Ray Serve)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec")
        p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray instance)")
        p.set_defaults(func=func)
        if name == "run":
            p.add_argument("--allow-changed-spec", action="store_true",
                           help="resume a run whose spec changed since it started (default: refuse)")

    p = sub.add_parser("merge-state", help="put a state into a base checkpoint file")
    p.add_argument("--base", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge_state)

    p = sub.add_parser("export-state", help="convert a state file (safetensors for Ai00)")
    p.add_argument("--state", required=True)
    p.add_argument("--format", choices=["safetensors"], default="safetensors")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_state)

    p = sub.add_parser("merge", help="fold a LoRA, PiSSA or DiSHA adapter into a full BlinkDL checkpoint")
    p.add_argument("--type", choices=["lora", "pissa", "disha"], help="default: told by the adapter")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True, help="adapter file, or a peft save_pretrained folder")
    p.add_argument("--init", help="PiSSA's init_pissa.pth, for RWKV-PEFT's PiSSA files (ours carry it)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="cast every tensor (default: keep the base's dtypes)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha, for RWKV-PEFT LoRA files (ours store it)")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # RWKV-PEFT's flags go to their own parser untouched (argparse's REMAINDER can't)
        args = argparse.Namespace(func=cmd_train, flags=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
