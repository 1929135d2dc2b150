"""From scored records to the results rows: a value per (state, file, metric), its 95% interval, and each state's
paired comparison with `base` over the same items.

Intervals are percentile bootstraps over the items (a fixed seed, so the same records give the same rows
everywhere); the comparison resamples the per-item differences, which is what makes it paired.
"""
from __future__ import annotations

import numpy as np

from rwkvray.eval.scoring import Record

BASE = "base"
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
ACCURACY_METRICS = ("mc_acc", "exact", "contains")  # shown in percent, compared in points


def metric_values(records: list[Record]) -> dict[tuple[str, str, str], list[float]]:
    """(state, data, metric) -> the items' values in item order; keys in first-seen order."""
    table: dict[tuple[str, str, str], list[float]] = {}
    for record in records:
        for metric, value in record.values.items():
            table.setdefault((record.state, record.data, metric), []).append(value)
    return table


def bootstrap_interval(values: np.ndarray) -> list[float]:
    """95% percentile interval of the mean, over BOOTSTRAP_SAMPLES resamples of the items."""
    if len(values) == 1:
        return [float(values[0]), float(values[0])]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = values[rng.integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def summarize(records: list[Record]) -> list[dict]:
    """The results rows: {"state", "data", "metric", "value", "n", "ci95": [lo, hi]}."""
    rows = []
    for (state, data, metric), values in metric_values(records).items():
        array = np.asarray(values, dtype=np.float64)
        rows.append({"state": state, "data": data, "metric": metric, "value": float(array.mean()), "n": len(array),
                     "ci95": bootstrap_interval(array)})
    return rows


def compare_with_base(records: list[Record]) -> list[dict]:
    """For every state but base, file and metric: the mean paired difference state - base and its 95% interval."""
    table = metric_values(records)
    out = []
    for (state, data, metric), values in table.items():
        base = table.get((BASE, data, metric))
        if state == BASE or base is None:
            continue
        differences = np.asarray(values, dtype=np.float64) - np.asarray(base, dtype=np.float64)
        out.append({"state": state, "data": data, "metric": metric, "difference": float(differences.mean()),
                    "ci95": bootstrap_interval(differences), "n": len(differences)})
    return out


def value_of(results: list[dict], state: str, data: str, metric: str) -> float:
    """One value from the results rows."""
    for row in results:
        if (row["state"], row["data"], row["metric"]) == (state, data, metric):
            return row["value"]
    raise KeyError(f"no result for {state}/{data}/{metric}")
