"""Say what a rerun of a run will do: start, resume from step N, or nothing (already complete).

The driver stores the training-relevant part of the spec in `storage_path/name/spec.json`. Rerunning with a
different spec is refused, naming the changed keys, unless the user allows it. Sweeps keep the same record
(launch/sweep_plan.py).
"""
import hashlib
import json
import posixpath
import re

from rwkvray.files import storage
from rwkvray.errors import UserError
from rwkvray.files.manifest import checkpoint_folders, storage_problem
from rwkvray.train.metrics import read_metrics

# keys that may change between a run and its resumption: where things go, retries, logging, hardware
FREE_KEYS = ("run.max_failures", "run.keep_checkpoints", "run.storage_path", "run.publish", "trainer.proj_dir",
             "logging.", "scaling.", "serve.")
# Under `ray job submit --working-dir`, paths resolve inside Ray's copy of that folder, named after a hash of its
# content: any edited file moves it. Paths inside it are compared relative to it.
JOB_PACKAGE = re.compile(r"^.*/runtime_resources/working_dir_files/[^/]+(?=/|$)")
JOB_WORKING_DIR = "<job working dir>"


def training_keys(spec, free: tuple[str, ...] = FREE_KEYS + ("tune.",)) -> dict:
    """The spec as {dotted key: value}, without the keys (or key prefixes) in `free`."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(spec.model_dump(mode="json"), "")
    return comparable({k: v for k, v in flat.items() if not k.startswith(free)})


def comparable(keys: dict) -> dict:
    """The keys with paths inside a Ray job's working dir made relative to it (records made before this rule
    hold the full paths, and compare equal too)."""
    return {k: JOB_PACKAGE.sub(JOB_WORKING_DIR, v) if isinstance(v, str) else v for k, v in keys.items()}


def spec_hash(keys: dict) -> str:
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def changed_keys(keys: dict, stored: dict) -> list[str]:
    stored = comparable(stored)
    return sorted(k for k in set(keys) | set(stored) if keys.get(k) != stored.get(k))


def check_changes(spec, kind: str, folder: str, changed: list[str], allow_changed_spec: bool) -> None:
    """Refuse a changed spec naming the keys, or say it resumes with them when the user allows it."""
    if not changed:
        return
    if not allow_changed_spec:
        raise UserError(f"{spec.source}: {kind} {spec.run.name!r} in {folder} was started with a different spec "
                        f"(changed: {', '.join(changed)}); use a new run.name, or --allow-changed-spec to "
                        "resume with the new values")
    print(f"resuming with a changed spec (changed: {', '.join(changed)})")


def read_record(folder: str) -> dict | None:
    stored = storage.read_bytes(storage.join(folder, "spec.json"))
    return None if stored is None else json.loads(stored)


def write_record(folder: str, keys: dict, **extra) -> None:
    record = {"hash": spec_hash(keys), "keys": keys, **extra}
    storage.write_bytes(storage.join(folder, "spec.json"), json.dumps(record, indent=1).encode())


def check_rerun(spec, allow_changed_spec: bool = False) -> int | None:
    """Compare the spec with the one stored with the run and print what happens; returns the step the run
    stands at (None for a new run). Records the spec for the next rerun."""
    run = storage.run_dir(spec)
    keys = training_keys(spec)
    stored = read_record(run)
    if stored is not None and stored["hash"] != spec_hash(keys):
        check_changes(spec, "run", run, changed_keys(keys, stored["keys"]), allow_changed_spec)
    total = spec.trainer.epoch_count * spec.trainer.epoch_steps
    rows = read_metrics(storage.join(run, "metrics.jsonl"))
    step = rows[-1]["step"] if rows else None
    if step is not None and step >= total:
        print(f"run {spec.run.name!r} already complete at step {step}/{total}")
    elif step is not None:
        step = intact_checkpoint_step(spec, run) or step
        print(f"resuming run {spec.run.name!r} from step {step}/{total}")
    write_record(run, keys)
    return step


def intact_checkpoint_step(spec, run: str) -> int | None:
    """The step of the run's newest intact checkpoint (None when it has no checkpoint)."""
    return newest_intact_checkpoint(spec, run)[1]


def newest_intact_checkpoint(spec, run: str) -> tuple[int, int | None]:
    """(how many checkpoints are newer than the newest intact one, its step). Intact here is the quick check:
    every file there with the size its manifest gives; the workers also compare checksums and print a warning
    for each checkpoint they skip. A run with checkpoints and none intact is a UserError: Ray cannot resume it."""
    fs, folder = storage.filesystem(run)
    names = checkpoint_folders(fs, folder)
    for skipped, name in enumerate(names):
        problem = storage_problem(fs, posixpath.join(folder, name))
        if problem is None:
            with fs.open_input_stream(posixpath.join(folder, name, "progress.json")) as f:
                return skipped, json.loads(f.read())["step"]
        if skipped == 0:
            newest_problem = problem
    if names:
        raise UserError(f"{spec.source}: run {spec.run.name!r}: none of its {len(names)} checkpoint(s) in {run} is "
                        f"intact (newest: {names[0]}: {newest_problem}); to start the run over, delete {run} "
                        "or use a new run.name")
    return 0, None
