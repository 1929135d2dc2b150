"""`rwkvray tune`: sweep the learning-rate schedule with Ray Tune, then hand back the best state.

Each trial runs the same training loop and DeepSpeed engine as `rwkvray run`: in the trial's process for
single-worker trials (a process group of one), or as a Ray Train run of its own when the spec asks for several
workers. A trial's epoch files and metrics land in <storage_path>/<name>/trials/<trial id>.
"""
import contextlib
import functools
import json
import os
import shutil

from rwkvray.files import storage
from rwkvray.files.atomic import atomic_path
from rwkvray.launch.sweep_plan import plan_sweep
from rwkvray.launch.tune_space import ray_search_space, spec_for_trial
from rwkvray.peft.registry import method_classes
from rwkvray.train.loop import WorkerContext, train

METRIC_KEYS = {"val_loss": "val_loss", "train_loss": "loss"}  # spec metric -> key the training loop reports


def metric_key(metric: str) -> str:
    """The reported key of tune.metric (an eval/<file>/<metric> is reported under its own name)."""
    return METRIC_KEYS.get(metric, metric)


def run_trial(config: dict, spec) -> None:
    import ray.tune
    trial_spec = spec_for_trial(spec, config, ray.tune.get_context().get_trial_id())
    if spec.scaling.num_workers == 1:
        ctx = WorkerContext.tune_trial(spec.tune.gpus_per_trial > 0)
        if spec.eval is not None:
            from rwkvray.launch.tune_eval import EvalReportingContext
            ctx = EvalReportingContext(ctx, trial_spec)
        train(trial_spec, ctx)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from rwkvray.launch.run import build_trainer
    build_trainer(trial_spec, callbacks=[TuneReportCallback()]).fit()


def run_sweep(spec, address: str | None = None, allow_changed_spec: bool = False):
    """Run, resume or grow the sweep (see launch/sweep_plan.py); print the trial table; write best_state.pth
    and best.json. A complete sweep starts no Ray: its results are read from storage."""
    from rwkvray.launch.ray_session import off_main_thread, ray_session, worker_env
    sweep = spec.tune
    plan = plan_sweep(spec, allow_changed_spec)
    if plan.complete:
        results = [r for part in plan.parts for r in _stored_results(spec, part)]
    else:
        # one kept checkpoint per trial is the point: no warning about syncing it
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # a one-worker trial trains in the trial's own process; a larger one sets its workers' env in build_trainer
        trial_on_cpu = spec.scaling.num_workers == 1 and sweep.gpus_per_trial == 0
        with ray_session(address, worker_env(use_gpu=not trial_on_cpu)):
            results = off_main_thread(lambda: [r for part in plan.parts for r in _fit_part(spec, part, plan.done)])
    total_steps = spec.trainer.epoch_count * spec.trainer.epoch_steps
    metric = metric_key(sweep.metric)
    beside = ["val_loss"] if metric.startswith("eval/") else []  # an eval metric is shown beside val_loss
    print(trial_table(results, metric, sweep.mode, list(sweep.space), total_steps, beside))
    return export_best(spec, results, metric, sweep.mode)


def _stored_results(spec, part):
    from ray import tune
    return list(tune.ResultGrid(tune.ExperimentAnalysis(storage.join(storage.run_dir(spec), part.name))))


def _fit_part(spec, part, finished: dict[str, int]):
    """The part's trials: read back when all finished, else resumed (errored ones again) or started."""
    from ray import tune
    done = finished.get(part.name)
    if done is not None and done >= part.count:
        return _stored_results(spec, part)
    sweep_dir = storage.run_dir(spec)  # Ray Tune's experiment storage (may be a URI)
    trainable = tune.with_resources(functools.partial(run_trial, spec=spec), _trial_resources(spec))
    if done is not None:
        with legacy_tune_output():
            return list(tune.Tuner.restore(storage.join(sweep_dir, part.name), trainable, resume_errored=True).fit())
    metric = metric_key(spec.tune.metric)
    checkpoints = tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                        checkpoint_score_order=spec.tune.mode)
    tuner = tune.Tuner(trainable, param_space=ray_search_space(spec.tune),
                       tune_config=_tune_config(spec.tune, metric, part.configs(spec)),
                       run_config=tune.RunConfig(name=part.name, storage_path=sweep_dir, checkpoint_config=checkpoints,
                                                 verbose=0))  # no trial tables: each trial's lines, then ours
    with legacy_tune_output():
        return list(tuner.fit())


@contextlib.contextmanager
def legacy_tune_output():
    """Ray Tune's new output engine prints its experiment box and trial tables even at verbose=0; the legacy
    engine honours it, so only the trials' lines and our summary show."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _trial_resources(spec) -> dict:
    sweep = spec.tune
    if spec.scaling.num_workers > 1:  # the trial only drives a Ray Train run, whose workers hold the resources
        return {"cpu": 0}
    return {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}


def _tune_config(sweep, metric: str, configs: list[dict]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    options = sweep.scheduler
    if options.type == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=options.grace_period,
                                  reduction_factor=options.reduction_factor, max_t=options.max_t or 10**9)
    else:
        scheduler = FIFOScheduler()
    search = BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=sweep.max_concurrent_trials)
    return tune.TuneConfig(metric=metric, mode=sweep.mode, num_samples=len(configs), scheduler=scheduler,
                           search_alg=search)


def trial_table(results, metric: str, mode: str, params: list[str], total_steps: int, beside: tuple = ()) -> str:
    """One line per trial: its sampled values, best metric (and the best of the metrics `beside` it, minimised),
    reports made and how it ended."""
    header = ["trial", *params, f"best {metric}", *(f"best {key}" for key in beside), "reports", "status"]
    rows = [header]
    for result in results:
        best = _best_value(result, metric, mode)
        finished = result.metrics.get("step") == total_steps
        status = "error" if result.error else ("finished" if finished else "stopped early")
        rows.append([str(result.metrics.get("trial_id", "?")),
                     *(f"{result.config.get(p):.4g}" for p in params),
                     shown(best), *(shown(_best_value(result, key, "min")) for key in beside),
                     str(len(result.metrics_dataframe)), status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def shown(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _best_value(result, metric: str, mode: str):
    frame = result.metrics_dataframe
    if frame is None or metric not in frame:
        return None
    values = frame[metric].dropna()
    return None if values.empty else float(values.min() if mode == "min" else values.max())


def export_best(spec, results, metric: str, mode: str) -> dict:
    """Copy the best trial's state file to <proj_dir>/best_state.pth and describe it in best.json
    (proj_dir is <storage_path>/<name> unless the spec sets it)."""
    out_dir = spec.trainer.proj_dir
    scored = [(value, r) for r in results if (value := _best_value(r, metric, mode)) is not None]
    best = (min if mode == "min" else max)(scored, key=lambda pair: pair[0])[1]
    checkpoint = best.get_best_checkpoint(metric=metric, mode=mode)
    summary = {"trial": best.metrics.get("trial_id"), "params": {k: best.config[k] for k in spec.tune.space},
               metric: _best_value(best, metric, mode), "checkpoint": checkpoint.path}
    with checkpoint.as_directory() as folder:
        for cls in method_classes(spec.peft):
            name = "best_state.pth" if cls.name == "state" else f"best_{cls.name}.pth"
            with atomic_path(os.path.join(out_dir, name)) as tmp:
                shutil.copyfile(os.path.join(folder, f"{cls.name}.pth"), tmp)
            summary[cls.name + "_file"] = os.path.join(out_dir, name)
    with atomic_path(os.path.join(out_dir, "best.json")) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    params = ", ".join(f"{k}={_short(v)}" for k, v in summary["params"].items())
    print(f"best trial {summary['trial']}: {metric} {summary[metric]:.4f}, {params}")
    print(f"wrote {_shown_path(os.path.join(out_dir, 'best.json'))}")
    return summary


def _short(value) -> str:
    """4 significant digits, as in the trial table; best.json keeps the full values."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _shown_path(path: str) -> str:
    """Relative to the working directory when below it (runs/demo-tune/best.json), else absolute."""
    relative = os.path.relpath(os.path.abspath(path))
    return os.path.abspath(path) if relative.startswith(os.pardir) else relative
