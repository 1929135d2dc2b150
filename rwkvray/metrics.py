"""What a training run shows and leaves behind: a progress bar, train_log.txt, metrics.jsonl, loss.png, wandb."""
import json
import os
import time

from rwkvray.atomic import atomic_path


class RunLogger:
    """Rank 0 only: other ranks get a logger with enabled=False that does nothing."""

    def __init__(self, proj_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 wandb_project: str | None = None, wandb_mode: str = "offline", run_name: str = "rwkvray",
                 config: dict | None = None):
        self.enabled = enabled
        self.proj_dir = proj_dir
        if not enabled:
            return
        from tqdm import tqdm
        os.makedirs(proj_dir, exist_ok=True)
        self.metrics_path = os.path.join(proj_dir, "metrics.jsonl")
        self.history = self._read_history(start_step)
        self.log_file = open(os.path.join(proj_dir, "train_log.txt"), "a")
        self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} start at step {start_step} of {total_steps}\n")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.wandb = self._start_wandb(wandb_project, wandb_mode, run_name, config) if wandb_project else None

    def _read_history(self, start_step: int) -> list[dict]:
        """On resume, keep the lines of the steps already done, so the plot covers the whole run."""
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if r["step"] <= start_step]
        with atomic_path(self.metrics_path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return rows

    def _start_wandb(self, project, mode, run_name, config):
        import wandb
        os.environ.setdefault("WANDB_MODE", mode)
        return wandb.init(project=project, name=run_name, dir=self.proj_dir, config=config or {}, mode=os.environ["WANDB_MODE"])

    def log_step(self, step: int, loss: float, lr: float, tokens_per_s: float, **extra) -> None:
        if not self.enabled:
            return
        row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, **extra}
        self.history.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.log_file.write(f"step {step} loss {loss:.4f} lr {lr:.3e} tok/s {tokens_per_s:.0f}\n")
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        self.bar.update(1)
        if self.wandb:
            self.wandb.log(row, step=step)

    def note(self, text: str) -> None:
        if self.enabled:
            self.log_file.write(text + "\n")
            self.log_file.flush()
            self.bar.write(text)

    def finish(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.log_file.close()
        plot_loss(self.history, os.path.join(self.proj_dir, "loss.png"))
        if self.wandb:
            self.wandb.finish()


def plot_loss(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def summarize(proj_dir: str) -> str:
    """One line for the end of a run: how the loss moved (mean of the first and last few steps, up to five)."""
    with open(os.path.join(proj_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    window = max(1, min(5, len(rows) // 2))
    head, tail = rows[:window], rows[-window:]
    mean = lambda part: sum(r["loss"] for r in part) / len(part)
    line = f"loss {mean(head):.3f} -> {mean(tail):.3f} over {len(rows)} steps"
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    if val:
        line += f"; val_loss {val[0]:.3f} -> {val[-1]:.3f}"
    return line
