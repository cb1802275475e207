"""The output directory a run claims: locked, cleaned of killed saves, checked free or resumable,
and, with --overwrite, the previous run's files (only philora's own) deleted once the new run's
inputs have loaded."""

import contextlib
import shutil
from pathlib import Path
from typing import List

from ..core.config import RESUME_APPLIED, Config
from ..core.errors import PhiloraError
from ..model.loading import RUN_CONFIG
from .checkpoint import changed_settings, clean_stale, find_resumable
from .runlock import acquire as lock_output_dir

# The files of a run directory, named once (RUN_CONFIG, config.yaml, is model/loading.py's: sources read it)
METRICS_FILE = "metrics.jsonl"  # one JSON record per logged step and eval
LOSS_PLOT = "loss.png"
REPORT_MD, REPORT_JSON = "report.md", "report.json"  # the eval report (use/report.py)
TENSORBOARD_DIR = "tensorboard"  # TensorBoard's event files (a directory)
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", METRICS_FILE, RUN_CONFIG,
             LOSS_PLOT, REPORT_MD, REPORT_JSON, "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "longrope.json")


def claim(out: Path, resume: bool, overwrite: bool, cfg: Config, held: contextlib.ExitStack) -> tuple:
    """Rank 0: one trainer per output_dir (the lock is held until ``held`` closes); clean what
    killed saves left; then :func:`prepare_output_dir`."""
    held.enter_context(lock_output_dir(out))
    leftovers = clean_stale(out)
    if leftovers:
        print(f"removed what an interrupted save left in {out}: {', '.join(sorted(leftovers))}")
    return prepare_output_dir(out, resume, overwrite, cfg)


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, cfg: Config) -> tuple:
    """Check ``out`` is free (or resumable, with the same training settings): returns the
    verified checkpoint to resume from (or None); with ``overwrite``, the previous run's files,
    which :func:`remove_run` deletes only once the new run's inputs have loaded; and the
    settings a resume changes (config.RESUME_APPLIED: the run's length) as (key, old, new)."""
    if resume:
        ckpt = find_resumable(out)
        changes = changed_settings(ckpt, cfg)
        refused = [f"{k} {old!r} -> {new!r}" for k, old, new in changes if k not in RESUME_APPLIED]
        if refused:
            raise PhiloraError(f"--resume: {ckpt} was trained with other settings: {'; '.join(refused)}; "
                               f"resume with the run's values (see {ckpt / RUN_CONFIG}) or start a "
                               f"new run (another output_dir, or --overwrite)")
        if changes:  # the run's length: applied, said here and at the top of config.yaml
            print(f"--resume: applied {'; '.join(f'{k} {old!r} -> {new!r}' for k, old, new in changes)} "
                  f"(the learning-rate schedule follows the new length from {ckpt.name} on)")
        return ckpt, [], changes
    existing = [p for p in out.glob("*") if p.name in RUN_FILES or p.name.startswith("checkpoint-")
                or p.name == TENSORBOARD_DIR] if out.is_dir() else []
    if existing and not overwrite:
        raise PhiloraError(f"output_dir '{out}' already holds a run; pass --resume to continue it, "
                           f"--overwrite to replace it, or set training_config.output_dir")
    return None, existing, []


def remove_run(paths: List[Path]) -> None:
    """Delete the previous run's files (--overwrite): only philora's own, never a directory the
    user filled."""
    for p in paths:
        try:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise PhiloraError(f"--overwrite: cannot delete '{p}': {e.strerror or e}") from None
