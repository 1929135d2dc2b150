"""Say what a rerun of a run will do: start, resume from step N, or nothing (already complete).

The driver stores the training-relevant part of the spec in `storage_path/name/spec.json`. Rerunning with a
different spec is refused, naming the changed keys, unless the user allows it.
"""
import hashlib
import json

from rwkvray.files import storage
from rwkvray.errors import UserError
from rwkvray.train.metrics import read_metrics

# keys that may change between a run and its resumption: where things go, retries, logging, hardware
FREE_KEYS = ("run.max_failures", "run.keep_checkpoints", "run.storage_path", "trainer.proj_dir", "logging.",
             "scaling.", "serve.", "tune.")


def training_keys(spec) -> dict:
    """The spec as {dotted key: value}, without the keys that may change on resume."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(spec.model_dump(mode="json"), "")
    return {k: v for k, v in flat.items() if not k.startswith(FREE_KEYS)}


def spec_hash(keys: dict) -> str:
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def check_rerun(spec, allow_changed_spec: bool = False) -> int | None:
    """Compare the spec with the one stored with the run and print what happens; returns the step the run
    stands at (None for a new run). Records the spec for the next rerun."""
    run = storage.run_dir(spec)
    keys = training_keys(spec)
    stored_bytes = storage.read_bytes(storage.join(run, "spec.json"))
    total = spec.trainer.epoch_count * spec.trainer.epoch_steps
    if stored_bytes is not None:
        stored = json.loads(stored_bytes)
        if stored["hash"] != spec_hash(keys):
            changed = sorted(k for k in set(keys) | set(stored["keys"]) if keys.get(k) != stored["keys"].get(k))
            if not allow_changed_spec:
                raise UserError(f"{spec.source}: run {spec.run.name!r} in {run} was started with a different spec "
                                f"(changed: {', '.join(changed)}); use a new run.name, or --allow-changed-spec to "
                                "resume with the new values")
            print(f"resuming with a changed spec (changed: {', '.join(changed)})")
    rows = read_metrics(storage.join(run, "metrics.jsonl"))
    step = rows[-1]["step"] if rows else None
    if step is not None and step >= total:
        print(f"run {spec.run.name!r} already complete at step {step}/{total}")
    elif step is not None:
        print(f"resuming run {spec.run.name!r} from step {step}/{total}")
    storage.write_bytes(storage.join(run, "spec.json"),
                        json.dumps({"hash": spec_hash(keys), "keys": keys}, indent=1).encode())
    return step
