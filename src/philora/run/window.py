"""The log window: what the steps since the last log record add up to, and the record itself.

Each rank sums its own steps; a record sums the ranks. A checkpoint keeps the window's global sums
(and a resume hands them to rank 0), so a resumed run logs the same records as one never stopped.
Non-finite steps are left out of the loss, and counted.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from . import distributed
from .distributed import World
from .objective import averages
from .step import StepResult


@dataclass
class Window:
    t: float  # when the window began (the logger's clock)
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    labels: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    tokens: int = 0
    skipped: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)  # the objective's metric sums (preference: rewards/*)

    @classmethod
    def resumed(cls, carried: Optional[dict], t: float, main: bool) -> "Window":
        """A checkpoint's window on rank 0 (the others start empty); a new one without."""
        if not (carried and main):
            return cls(t)
        return cls(carried["t"], torch.tensor(carried["loss"]), torch.tensor(carried["labels"]),
                   carried["tokens"], carried.get("skipped", 0), dict(carried.get("metrics", {})))

    def add(self, step: StepResult, metrics: Optional[Dict[str, float]] = None) -> None:
        if step.bad:
            self.skipped += 1
        else:
            self.loss += step.loss
            self.labels += step.labels
        for k, v in (metrics or {}).items():  # every rank keeps the same keys (their sums are one collective)
            self.metrics[k] = self.metrics.get(k, 0.0) + (0.0 if step.bad else v)
        self.tokens += step.tokens

    def totals(self, world: World) -> tuple:
        """(loss, labels, tokens) summed over ranks."""
        return distributed.all_sum(world, self.loss, self.labels, torch.tensor(float(self.tokens)))

    def saved(self, world: World) -> dict:
        """What a checkpoint keeps (global sums)."""
        loss, labels, tokens = self.totals(world)
        keys = sorted(self.metrics)
        sums = distributed.all_sum(world, *[torch.tensor(self.metrics[k]) for k in keys]) if keys else []
        metrics = {k: t.item() for k, t in zip(keys, sums)}
        return {"loss": loss.item(), "labels": labels.item(), "tokens": int(tokens.item()), "t": self.t,
                "skipped": self.skipped, "metrics": metrics}

    def record(self, world: World, now, step: int, lr: float, grad_norm, epoch: float) -> tuple:
        """(the log record of the window ending at ``step``, when it ends: ``now()`` after the sums)."""
        loss, labels, tokens = self.totals(world)
        t = now()
        rec = {"step": step, "loss": round((loss / labels.clamp(min=1)).item(), 6), "lr": lr,
               "grad_norm": round(float(grad_norm), 6), "tokens": int(tokens.item()),
               "tokens_per_s": round(tokens.item() / max(t - self.t, 1e-9), 1), "epoch": round(epoch, 4),
               **averages(world, self.metrics)}
        if self.skipped:
            rec["skipped_steps"] = self.skipped
            if labels.item() == 0:
                rec["loss"] = None
        return rec, t
