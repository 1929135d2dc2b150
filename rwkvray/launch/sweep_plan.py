"""What a rerun of `rwkvray tune` does: start the sweep, resume it, grow it by new samples, or nothing.

A sweep is one or more Ray Tune experiments ("parts") in storage_path/name: `sweep` holds the first
tune.num_samples trials; `sweep-2`, `sweep-3`, ... hold the trials a grown num_samples added (Tune cannot add
samples to an experiment it restores). spec.json records the spec's hash and the parts. Sample i is drawn from
the seed and i alone, so a sweep grown from 4 to 6 trials runs the same 6 configurations as a fresh one.
"""
from dataclasses import dataclass

from rwkvray.files import storage
from rwkvray.launch.resume import FREE_KEYS, changed_keys, check_changes, read_record, spec_hash, training_keys, \
    write_record
from rwkvray.launch.tune_space import ray_search_space

# tune keys that may change between a sweep and its resumption: concurrency and hardware
SWEEP_FREE_KEYS = ("tune.max_concurrent_trials", "tune.cpus_per_trial", "tune.gpus_per_trial")


@dataclass(frozen=True)
class Part:
    name: str   # the Tune experiment's folder in the sweep's storage
    first: int  # index of its first sample
    count: int

    def configs(self, spec) -> list[dict]:
        return sample_configs(spec, self.first + self.count)[self.first:]


@dataclass(frozen=True)
class SweepPlan:
    parts: list[Part]
    done: dict[str, int]  # finished trials per part that exists in storage

    @property
    def complete(self) -> bool:
        return all(self.done.get(p.name, 0) >= p.count for p in self.parts)


def plan_sweep(spec, allow_changed_spec: bool = False) -> SweepPlan:
    """Compare the spec with the one stored with the sweep, print what the rerun does and record the spec."""
    folder = storage.run_dir(spec)
    keys = training_keys(spec, FREE_KEYS + SWEEP_FREE_KEYS)
    stored = read_record(folder)
    parts = [Part(**p) for p in stored["parts"]] if stored else []
    if stored and stored["hash"] != spec_hash(keys):
        changed = changed_keys(keys, stored["keys"])
        if changed != ["tune.num_samples"] or spec.tune.num_samples < stored["keys"]["tune.num_samples"]:
            check_changes(spec, "sweep", folder, changed, allow_changed_spec)
    have, wanted = sum(p.count for p in parts), spec.tune.num_samples
    if parts and wanted > have:
        print(f"sweep {spec.run.name!r} grows from {have} to {wanted} trials")
    if wanted > have:
        parts.append(Part("sweep" if not parts else f"sweep-{len(parts) + 1}", have, wanted - have))
    finished = {p.name: finished_trials(storage.join(folder, p.name)) for p in parts}
    plan = SweepPlan(parts, {name: n for name, n in finished.items() if n is not None})
    total, done = sum(p.count for p in parts), sum(plan.done.values())
    if plan.complete:
        print(f"sweep {spec.run.name!r} already complete: {done}/{total} trials")
    elif stored or plan.done:
        print(f"resuming sweep {spec.run.name!r}: {done} of {total} trials done")
    write_record(folder, keys, parts=[vars(p) for p in parts])
    return plan


def finished_trials(experiment: str) -> int | None:
    """Trials Tune finished (or stopped early) in an experiment folder; None when there is none yet."""
    from ray import tune
    if not tune.Tuner.can_restore(experiment):
        return None
    return sum(trial.status == "TERMINATED" for trial in tune.ExperimentAnalysis(experiment).trials)


def sample_configs(spec, count: int) -> list[dict]:
    """The sweep's first `count` samples of tune.space, drawn in order from trainer.seed."""
    import numpy as np
    space = ray_search_space(spec.tune)
    rng = np.random.default_rng(spec.trainer.seed)
    return [{key: domain.sample(random_state=rng) for key, domain in space.items()} for _ in range(count)]
