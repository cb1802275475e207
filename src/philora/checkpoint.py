"""Training checkpoints: written atomically, read without pickle, rotated.

``output_dir/checkpoint-STEP/`` holds ``lora.safetensors`` (philora's own LoRA tensors, exact),
``optimizer.pt`` and ``scheduler.pt`` (state dicts), ``rng.pt`` (torch/CUDA/Python RNG states),
``trainer_state.json`` (step, samples seen, ...) and ``config.yaml``. A checkpoint is built in a
temporary directory and renamed into place, so a kill during a save leaves the previous one
intact; ``.pt`` files are read with ``torch.load(weights_only=True)``: no arbitrary pickles.
"""

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import PhiloraError, first_line
from .lora import lora_state_dict

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(PhiloraError):
    """A checkpoint that cannot be read or does not fit this run; the message is one line."""


def trainable_state(model) -> dict:
    """What a checkpoint stores of the model: the LoRA tensors and every other trainable
    parameter (biases with ``peft_config.bias`` all / lora_only), keys as in ``state_dict``."""
    state = dict(lora_state_dict(model))
    for n, p in model.named_parameters():
        if p.requires_grad and n not in state:
            state[n] = p
    return state


def list_checkpoints(output_dir) -> list:
    """Complete checkpoints in ``output_dir``, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := CKPT_RE.match(p.name)) and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Optional[Path]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, step: int, model, optimizer, scheduler, trainer_state: dict,
                    config_yaml: str, save_total_limit: int = 0) -> Path:
    """Write ``checkpoint-STEP`` atomically; keep at most ``save_total_limit`` (0: all)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=out))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in trainable_state(model).items()}
        save_file(tensors, str(tmp / "lora.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            old = out / f".old-checkpoint-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit > 0:
        for old in list_checkpoints(out)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore LoRA tensors, optimizer, scheduler and RNG from ``path``; returns trainer_state.

    The checkpoint must hold exactly this model's trainable tensors, with the same shapes
    (same peft_config), else CheckpointError names the checkpoint and the first difference.
    """
    path = Path(path)
    try:
        tensors = load_file(str(path / "lora.safetensors"))
    except Exception as e:  # missing or damaged file
        raise CheckpointError(f"{path}: cannot read lora.safetensors: {first_line(e)}") from None
    expected = trainable_state(model)
    hint = f"resume with the peft_config the run was trained with (see {path / 'config.yaml'})"
    extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if extra:
        raise CheckpointError(f"{path}: the checkpoint has tensors this model lacks, e.g. '{extra[0]}'; {hint}")
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks tensors this model trains, e.g. '{missing[0]}'; {hint}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{path}: '{k}' is {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(expected[k].shape)} in this model; {hint}")
    model.load_state_dict(tensors, strict=False)  # through the layers' own load hooks
    try:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot restore the training state: {first_line(e)}") from None
    set_rng_state(rng)
    return state
