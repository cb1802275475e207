"""What a run reports: a tqdm progress bar, ``metrics.jsonl``, TensorBoard events, a loss plot.

Only the main process writes (``enabled=False`` elsewhere). ``metrics.jsonl`` has one JSON
object per logging step (step, loss, lr, grad_norm, tokens, tokens_per_s, elapsed) and per
evaluation (step, eval_loss, eval_perplexity); it is appended to, so a resumed run continues it
(after dropping the records of steps after the checkpoint it resumes from: they are redone).
"""

import json
import math
import time
from pathlib import Path
from typing import Optional


class RunLogger:
    def __init__(self, output_dir, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress_bar: bool = True, elapsed: float = 0.0):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.t0 = time.perf_counter() - elapsed
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:  # a resume: drop what the interrupted run logged after its checkpoint
            _truncate_metrics(self.dir / "metrics.jsonl", start_step)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard likewise hides the interrupted run's events after start_step
            self.tb = SummaryWriter(str(self.dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step > 0 else None)
        except ImportError:  # tensorboard is a dependency, but never fail a run over it
            self.tb = None
        if progress_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "elapsed": round(self.elapsed(), 3)}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("step", "elapsed") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, step)
            self.tb.flush()

    def progress(self, steps: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps <= ``last_step`` (the checkpoint's): the steps after it are
    trained again, so a resumed run logs each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            continue  # a line cut short by the kill
        if isinstance(step, (int, float)) and step <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


def read_metrics(output_dir) -> list:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(output_dir, path: Optional[Path] = None) -> Optional[Path]:
    """Plot train and eval loss from ``metrics.jsonl`` to ``loss.png``; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    path = path or Path(output_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
