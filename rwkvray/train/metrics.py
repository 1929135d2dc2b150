"""What a training run shows and leaves behind: progress lines, metrics.jsonl, loss.png, wandb."""
import io
import json
import sys
import time

from rwkvray.files import storage

PROGRESS_EVERY_S = 30.0  # without a terminal: one progress line this often (a tqdm bar would be blank lines)


class RunLogger:
    """Rank 0 only: other ranks get a logger with enabled=False that does nothing. metrics.jsonl lives in run
    storage (`run_dir`), rewritten whole at each report, so the driver reads it from there."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 wandb_project: str | None = None, wandb_mode: str = "offline", wandb_dir: str | None = None,
                 run_name: str = "rwkvray", config: dict | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.metrics_path = storage.join(run_dir, "metrics.jsonl")
        self.history = [r for r in read_metrics(self.metrics_path) if r["step"] <= start_step]
        self.total_steps = total_steps
        self.bar = self._progress_bar(total_steps, start_step)
        self.last_line = time.monotonic()
        self.note(f"start at step {start_step} of {total_steps}")
        self.wandb = self._start_wandb(wandb_project, wandb_mode, wandb_dir, run_name, config) if wandb_project else None

    @staticmethod
    def _progress_bar(total_steps: int, start_step: int):
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm
        return tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @staticmethod
    def _start_wandb(project, mode, folder, run_name, config):
        import wandb
        return wandb.init(project=project, name=run_name, dir=folder, config=config or {}, mode=mode)

    def log_step(self, step: int, loss: float, lr: float, tokens_per_s: float, *, report_follows: bool = False,
                 **extra) -> None:
        """Without a terminal, a progress line every PROGRESS_EVERY_S, unless this step's report line follows."""
        if not self.enabled:
            return
        row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, **extra}
        self.history.append(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            self.bar.update(1)
        elif not report_follows and time.monotonic() - self.last_line >= PROGRESS_EVERY_S:
            self.note(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3e} tok/s {tokens_per_s:.0f}")
        if self.wandb:
            self.wandb.log(row, step=step)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)
        self.last_line = time.monotonic()

    def save_metrics(self) -> None:
        if self.enabled:
            storage.write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history).encode())

    def finish(self) -> None:
        if not self.enabled:
            return
        self.save_metrics()
        if self.bar is not None:
            self.bar.close()
        if self.wandb:
            self.wandb.finish()


def read_metrics(path: str) -> list[dict]:
    payload = storage.read_bytes(path)
    return [json.loads(line) for line in (payload or b"").decode().splitlines() if line.strip()]


def loss_plot_png(rows: list[dict]) -> bytes:
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def summarize(rows: list[dict]) -> str:
    """One line for the end of a run: how the loss moved (mean of the first and last few steps, up to five)."""
    window = max(1, min(5, len(rows) // 2))
    head, tail = rows[:window], rows[-window:]
    mean = lambda part: sum(r["loss"] for r in part) / len(part)
    line = f"loss {mean(head):.3f} -> {mean(tail):.3f} over {len(rows)} steps"
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    if val:
        line += f"; val_loss {val[0]:.3f} -> {val[-1]:.3f}"
    return line
