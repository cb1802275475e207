"""The run's length and its learning rate at each step: one pure function, ``get_lr(step, ...)``.

The three schedules are transformers' ``get_scheduler`` formulas for cosine, linear and constant
(which, as there, ignores warmup), step for step (tested against it), written out because
importing ``transformers.get_scheduler`` pulls in PEFT and bitsandbytes (seconds of start-up and a
warning on every run). A function of the step, not a LambdaLR: the loop sets every parameter
group's rate from the step before each update, so a resumed run has the right rate by
construction (a resume that changes the run's length follows the new length from its step on).
"""

import math
from dataclasses import dataclass
from typing import List, Tuple

from ..core.config import Config


def total_steps(cfg: Config, n_train: int, world: int) -> int:
    """Optimizer steps in the run: max_steps, or the epochs over ``n_train`` samples."""
    tc = cfg.training_config
    if tc.max_steps > 0:
        return tc.max_steps
    per_step = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world
    return max(1, math.ceil(tc.num_train_epochs * n_train / per_step))


def warmup_steps(cfg: Config, total: int) -> int:
    """warmup_steps, or warmup_ratio of the run's ``total`` steps."""
    tc = cfg.training_config
    return tc.warmup_steps if tc.warmup_steps > 0 else math.ceil(tc.warmup_ratio * total)


def lr_factor(step: int, name: str, warmup: int, total: int) -> float:
    """The multiplier of the base rate at ``step`` (config.py checks ``name``)."""
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)  # cosine
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def get_lr(step: int, base_lr: float, name: str, warmup: int, total: int) -> float:
    """The learning rate of a parameter group with rate ``base_lr`` at ``step`` (the product
    LambdaLR computes, so the same float)."""
    return base_lr * lr_factor(step, name, warmup, total)


@dataclass(frozen=True)
class Schedule:
    """A run's schedule: :func:`get_lr` for each parameter group (LoRA+ has several rates)."""
    name: str
    base_lrs: Tuple[float, ...]
    warmup: int
    total: int

    def lrs(self, step: int) -> List[float]:
        return [get_lr(step, base, self.name, self.warmup, self.total) for base in self.base_lrs]

    def apply(self, optimizer, step: int) -> None:
        """Set every parameter group's rate for the update of ``step``."""
        for group, lr in zip(optimizer.param_groups, self.lrs(step)):
            group["lr"] = lr

    def record(self, step: int) -> dict:
        """What a checkpoint's scheduler.pt holds: the settings and the rates at ``step``."""
        return {"name": self.name, "base_lrs": list(self.base_lrs), "warmup": self.warmup,
                "total": self.total, "step": step, "lrs": self.lrs(step)}


def schedule(cfg: Config, optimizer, total: int) -> Schedule:
    """The config's schedule over ``total`` steps, from the optimizer's groups' rates."""
    return Schedule(cfg.training_config.lr_scheduler_type, tuple(g["lr"] for g in optimizer.param_groups),
                    warmup_steps(cfg, total), total)
