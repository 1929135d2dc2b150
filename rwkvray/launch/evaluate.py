"""`rwkvray eval`: flags or a spec's eval block -> an EvalJob; run it; print the table, write the files."""
from __future__ import annotations

import os

from rwkvray.errors import UserError
from rwkvray.eval.report import chart_path, comparison_lines, plot, table, write_details, write_json
from rwkvray.eval.runner import EvalJob, run_eval
from rwkvray.spec.eval_block import MAX_EVAL_TOKENS, STATE_NAME

FLAGS_ONLY = ("model", "state", "data", "out", "details")


def job_from_flags(args) -> EvalJob:
    if not args.model:
        raise UserError("--model: required (the base checkpoint), or give a spec file with model and eval blocks")
    if not args.data:
        raise UserError("--data: give at least one eval jsonl file")
    if not 1 <= args.max_tokens <= MAX_EVAL_TOKENS:
        raise UserError(f"--max-tokens: must be 1 to {MAX_EVAL_TOKENS} (got {args.max_tokens})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: must be ≥ 1 (got {args.batch_size})")
    if not os.path.isfile(args.model):
        raise UserError(f"--model: {args.model}: no such file")
    for path in args.data:
        if not os.path.isfile(path):
            raise UserError(f"--data: {path}: no such file")
    return EvalJob(args.model, list(args.data), named_states(args.state), args.max_tokens, args.batch_size,
                   args.out, args.details)


def named_states(values: list[str]) -> dict[str, str]:
    states = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise UserError(f"--state {value}: expected NAME=PATH (a state file or a run folder)")
        if name == "base":
            raise UserError(f"--state {value}: 'base' is the base model, always scored; name the state otherwise")
        if not STATE_NAME.fullmatch(name):
            raise UserError(f"--state {value}: invalid name {name!r}: use 1-128 of A-Z a-z 0-9 . _ -")
        if name in states:
            raise UserError(f"--state {value}: the name {name} is given twice")
        states[name] = path
    return states


def job_from_spec(args) -> tuple[EvalJob, str]:
    given = [f"--{flag}" for flag in FLAGS_ONLY if getattr(args, flag)]
    if given:
        raise UserError(f"{given[0]}: give either a spec file or the flags, not both")
    from rwkvray.spec import EvalSpec, load_spec
    spec = load_spec(args.spec, kind=EvalSpec)
    block = spec.eval
    job = EvalJob(spec.model.path, list(block.data), dict(block.states), block.max_tokens, block.batch_size,
                  block.out, block.details)
    return job, f"{spec.source}: eval.states"


def eval_command(args) -> None:
    job, where = job_from_spec(args) if args.spec else (job_from_flags(args), "--state")
    for path in (job.out, job.details):
        if path and os.path.isdir(path):
            raise UserError(f"{path}: is a folder; --out and --details name files")
    results, records = run_eval(job, args.address, where)
    print(table(results))
    for line in comparison_lines(records):
        print(line)
    if job.out:
        write_json(job.out, {"results": results})
        plot(results, chart_path(job.out))
        print(f"wrote {job.out} and {chart_path(job.out)}")
    if job.details:
        write_details(job.details, records)
        print(f"wrote {job.details}")
