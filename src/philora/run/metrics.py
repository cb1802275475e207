"""What a run reports: a tqdm progress bar, ``metrics.jsonl``, TensorBoard events, a loss plot.

Only the main process writes (``enabled=False`` elsewhere). ``metrics.jsonl`` has one JSON
object per logging step (step, loss, lr, grad_norm, tokens, tokens_per_s, elapsed) and per
evaluation (step, eval_loss, eval_perplexity); it is appended to, so a resumed run continues it
(after dropping the records of steps after the checkpoint it resumes from, and of the final
evaluation: they are redone). A write that fails (disk full, read-only) is a one-line WriteError;
TensorBoard, secondary to metrics.jsonl, is switched off with one warning instead.
"""

import io
import json
import math
import threading
import time
from pathlib import Path
from typing import Optional

from ..core.diskio import write_bytes, write_error, write_text
from .outdir import LOSS_PLOT, METRICS_FILE, TENSORBOARD_DIR
from .trackers import generations_markdown


class RunLogger:
    def __init__(self, output_dir, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress_bar: bool = True, elapsed: float = 0.0, tensorboard: bool = True, trackers=None):
        self.enabled, self.closed = enabled, False
        self.trackers = trackers  # trackers.Trackers (report_to: mlflow, wandb, trackio): every record too
        self.dir = Path(output_dir)
        self.t0 = time.perf_counter() - elapsed
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:  # a resume: drop what the interrupted run logged after its checkpoint
            _truncate_metrics(self.dir / METRICS_FILE, start_step, total_steps)
        try:
            self.jsonl = open(self.dir / METRICS_FILE, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(self.dir / METRICS_FILE, e) from None
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard likewise hides the interrupted run's events after start_step
            self.tb = SummaryWriter(str(self.dir / TENSORBOARD_DIR),
                                    purge_step=start_step + 1 if start_step > 0 else None) if tensorboard else None
        except ImportError:  # tensorboard is a dependency, but never fail a run over it
            self.tb = None
        if self.tb is not None:  # its writer thread's I/O error is reported by write() in one line
            self._excepthook = threading.excepthook
            threading.excepthook = self._quiet_tensorboard_thread
        if progress_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def _quiet_tensorboard_thread(self, args) -> None:
        """threading.excepthook while open: TensorBoard's writer thread prints a traceback when a
        write fails, then hands the error to the next flush, which write() turns into one line."""
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard"):
            return
        self._excepthook(args)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "elapsed": round(self.elapsed(), 3)}
        try:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        except OSError as e:
            raise write_error(self.dir / METRICS_FILE, e) from None
        if self.tb is not None:
            step = record["step"]
            try:
                for k, v in record.items():
                    if k not in ("step", "elapsed") and isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, step)
                if "generations" in record:  # eval_generations: one markdown table per evaluation
                    self.tb.add_text("eval/generations", generations_markdown(record["generations"]), step)
                self.tb.flush()
            except Exception as e:  # noqa: BLE001 (its writer thread re-raises any I/O error)
                self.print(f"philora: warning: TensorBoard logging stopped: {write_error(self.dir / 'tensorboard', e)}")
                self.tb = None
        if self.trackers is not None:
            self.trackers.log(record)

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

    def close(self, quiet: bool = False) -> None:
        """Flush and close (once); ``quiet``: a run that already failed only lets go of its files."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            try:
                self.tb.close()
            except Exception:  # noqa: BLE001 (already reported by write, or nothing left to flush)
                pass
        if getattr(self, "_excepthook", None) is not None:
            threading.excepthook, self._excepthook = self._excepthook, None
        try:
            self.jsonl.close()
        except OSError as e:
            if not quiet:
                raise write_error(self.dir / METRICS_FILE, e) from None


def _truncate_metrics(path: Path, last_step: int, final_step: int) -> None:
    """Keep the records of steps <= ``last_step`` (the checkpoint's): the steps after it are
    trained again, and the final evaluation (at ``final_step``, after the last checkpoint) is
    run again, so a resumed run logs each step and each evaluation once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step = record.get("step", 0)
        except (ValueError, AttributeError):
            continue  # a line cut short by the kill
        final_eval = step == final_step and "loss" not in record  # train records have a loss
        if isinstance(step, (int, float)) and step <= last_step and not final_eval:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


def read_metrics(output_dir) -> list:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill or a full disk
    return [r for r in records if isinstance(r, dict)]


def plot_losses(output_dir, path: Optional[Path] = None) -> Optional[Path]:
    """Plot train and eval loss from ``metrics.jsonl`` to ``loss.png``; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    path = path or Path(output_dir) / LOSS_PLOT
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
