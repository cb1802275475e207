"""Opening a run, before anything large loads: the config's checks, torchrun, the signal
handlers, the output directory (locked, checked), the seeds and the device; and, once the model
and optimizer exist, the state a resume restores."""

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import yaml

from ..core.config import Config, check_values, config_to_dict
from ..core.errors import PhiloraError
from ..model.devices import pick_device
from . import distributed
from .checkpoint import load_checkpoint
from .distributed import World
from .outdir import claim
from .preempt import SignalGuard
from .trackers import check_trackers


@dataclass(frozen=True)
class Opened:
    """A run as opened: where it runs and writes, and what it resumes or replaces."""
    world: World
    guard: SignalGuard
    out: Path
    device: torch.device
    log: Callable  # print on rank 0, nothing elsewhere
    report_to: List[str]
    ckpt: Optional[Path]  # the checkpoint to resume from
    old_run: List[Path]  # --overwrite: the previous run's files, deleted once the inputs loaded
    applied: List[tuple]  # the settings a resume changes: (key, old, new)


def open_run(cfg: Config, resume: bool, overwrite: bool, held: contextlib.ExitStack) -> Opened:
    """Check, join torchrun, take the signals and (rank 0) the output directory until ``held``
    closes, seed, pick the device."""
    tc = cfg.training_config
    check_values(cfg)  # before --overwrite deletes anything
    report_to = check_trackers(tc.report_to)  # a tracker's missing package: one line, before anything loads
    world = distributed.setup()
    if tc.eval_generations and tc.fsdp and world.enabled:  # a sharded model generates only with every rank in step
        raise PhiloraError("training_config.eval_generations does not work with training_config.fsdp; set "
                           "eval_generations: 0 (the end-of-run report still generates) or fsdp: false")
    guard = held.enter_context(SignalGuard(announce=world.main))
    out = Path(tc.output_dir)
    ckpt, old_run, applied = distributed.on_main(world, lambda: claim(out, resume, overwrite, cfg, held))
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else pick_device()
    log = print if world.main else (lambda *a, **k: None)
    return Opened(world, guard, out, device, log, report_to, ckpt, old_run, applied)


def resume_state(run: Opened, cfg: Config, model, optimizer) -> dict:
    """The trainer state: a new run's, or the checkpoint's (LoRA tensors, optimizer and RNG
    restored into ``model`` and ``optimizer``)."""
    state = {"step": 0, "samples_seen": 0, "elapsed": 0.0, "world_size": run.world.size}
    if run.ckpt is None:
        return state
    tc = cfg.training_config
    state = load_checkpoint(run.ckpt, model, optimizer)
    distributed.check_resume(run.world, state, tc.per_device_train_batch_size, tc.gradient_accumulation_steps)
    state["world_size"] = run.world.size
    run.log(f"resumed from {run.ckpt} at step {state['step']}")
    return state


def run_config_yaml(cfg: Config, ckpt: Optional[Path], applied: List[tuple]) -> str:
    """The run's config.yaml; after a resume that changed the run's length, what was used before."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if applied:
        text = f"# resumed from {ckpt.name}, trained until then with " + ", ".join(
            f"{k}: {old!r}" for k, old, _ in applied) + "\n" + text
    return text
