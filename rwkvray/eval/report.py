"""What an evaluation leaves: the results JSON, the per-item details jsonl, the terminal table with the
comparison with base, and a PNG bar chart beside the JSON. Files are written atomically."""
from __future__ import annotations

import json
import os

from rwkvray.eval.metrics import ACCURACY_METRICS, compare_with_base
from rwkvray.eval.scoring import Record
from rwkvray.files.atomic import write_atomically


def write_json(path: str, payload) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, ensure_ascii=False)
            f.write("\n")
    write_atomically(path, write)


def detail_rows(records: list[Record]) -> list[dict]:
    """One row per item and state: prediction and correctness, or the item's loss for text and chat rows."""
    rows = []
    for record in records:
        row = {"state": record.state, "data": record.data, "index": record.index}
        if "loss" in record.values:
            row["loss"] = record.values["loss"]
        else:
            row["prediction"] = record.prediction
            row["correct"] = bool(record.values.get("mc_acc", record.values.get("exact")))
            if "contains" in record.values:
                row["contains"] = bool(record.values["contains"])
        rows.append(row)
    return rows


def write_details(path: str, records: list[Record]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in detail_rows(records):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomically(path, write)


def shown(metric: str, value: float) -> str:
    return f"{100 * value:.1f}" if metric in ACCURACY_METRICS else f"{value:.3f}"


def signed(metric: str, value: float) -> str:
    return f"{100 * value:+.1f}" if metric in ACCURACY_METRICS else f"{value:+.3f}"


def table(results: list[dict]) -> str:
    """States down, `file metric` across; each cell `value [lo, hi]` (accuracies in percent)."""
    columns = list(dict.fromkeys((row["data"], row["metric"]) for row in results))
    states = list(dict.fromkeys(row["state"] for row in results))
    cells = {(row["state"], row["data"], row["metric"]): row for row in results}
    header = ["state"] + [f"{data} {metric}{' %' if metric in ACCURACY_METRICS else ''}" for data, metric in columns]
    lines = [header]
    for state in states:
        line = [state]
        for data, metric in columns:
            row = cells.get((state, data, metric))
            line.append("" if row is None else f"{shown(metric, row['value'])} "
                        f"[{shown(metric, row['ci95'][0])}, {shown(metric, row['ci95'][1])}]")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def comparison_lines(records: list[Record]) -> list[str]:
    """'persona vs base: persona_eval.jsonl mc_acc +12.5 pts (95% CI +3.1 … +21.9)'."""
    lines = []
    for row in compare_with_base(records):
        metric, (low, high) = row["metric"], row["ci95"]
        unit = " pts" if metric in ACCURACY_METRICS else ""
        lines.append(f"{row['state']} vs base: {row['data']} {metric} {signed(metric, row['difference'])}{unit} "
                     f"(95% CI {signed(metric, low)} … {signed(metric, high)}, n={row['n']})")
    return lines


def chart_path(results_path: str) -> str:
    return os.path.splitext(results_path)[0] + ".png"


def plot(results: list[dict], path: str) -> None:
    """One panel per (file, metric), a bar per state with its 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = list(dict.fromkeys((row["data"], row["metric"]) for row in results))
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 0.8, 3.4), squeeze=False)
    for ax, (data, metric) in zip(axes[0], columns):
        rows = [row for row in results if (row["data"], row["metric"]) == (data, metric)]
        scale = 100 if metric in ACCURACY_METRICS else 1
        values = [scale * row["value"] for row in rows]
        errors = [[scale * (row["value"] - row["ci95"][0]) for row in rows],
                  [scale * (row["ci95"][1] - row["value"]) for row in rows]]
        ax.bar([row["state"] for row in rows], values, yerr=errors, capsize=4, color="#4c72b0")
        if scale == 100:
            ax.set_ylim(0, 100)
        ax.set_title(f"{data}\n{metric}{' (%)' if scale == 100 else ''}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
