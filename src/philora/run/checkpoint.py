"""Training checkpoints: written atomically, verified before use, read without pickle, rotated.

``output_dir/checkpoint-STEP/`` holds ``lora.safetensors`` (philora's own LoRA tensors, exact),
``optimizer.pt`` (a state dict), ``scheduler.pt`` (the learning-rate schedule's settings at that step,
a record: the rate is a function of the step, schedule.py), ``rng.pt`` (torch/CUDA/Python RNG states),
``trainer_state.json`` (step, samples seen, ...), ``config.yaml`` and ``manifest.json`` (the
sha256 and size of each other file). A checkpoint is built in a temporary directory and renamed
into place, so a kill during a save leaves the previous one intact, and nothing non-finite is
ever written. On resume each file is read once, checked against the manifest, and only then
deserialised (``.pt`` files with ``torch.load(weights_only=True)``: no arbitrary pickles); a
damaged checkpoint is reported in one line and the previous one is used.
Files are serialised in memory and written with plain writes, so a full disk is an OSError we
can name (torch's own writer reports it as an opaque C++ enforce failure).
"""

import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..lora import lora_state_dict
from ..core.config import RESUME_FREE, Config, config_to_dict
from ..core.diskio import default_mode, fsync_dir, remove_temporaries, write_error
from ..core.errors import PhiloraError, first_line
from ..model.loading import RUN_CONFIG

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"  # the step, the data position, the best eval: what resume reads first


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


def nonfinite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _optimizer_tensors(optimizer_state: dict) -> Dict[str, torch.Tensor]:
    return {f"optimizer state {i} {k}": v for i, s in optimizer_state.get("state", {}).items()
            for k, v in s.items() if torch.is_tensor(v)}


def list_checkpoints(output_dir) -> list:
    """Complete checkpoints in ``output_dir``, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := CKPT_RE.match(p.name)) and (p / TRAINER_STATE).exists()]
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


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(output_dir, step: int, model, optimizer, schedule: dict, trainer_state: dict,
                    config_yaml: str, save_total_limit: int = 0) -> Path:
    """Write ``checkpoint-STEP`` atomically; keep at most ``save_total_limit`` (0: all).

    Refuses (CheckpointError) to write non-finite weights or optimizer state; a full or read-only
    disk is a one-line WriteError. Either way the earlier checkpoints are untouched."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tensors = {k: v.detach().contiguous().cpu() for k, v in trainable_state(model).items()}
    opt_state = optimizer.state_dict()
    bad = nonfinite(tensors) or nonfinite(_optimizer_tensors(opt_state))
    if bad:
        raise CheckpointError(f"step {step}: '{bad}' holds NaN or infinite values; {final.name} was "
                              f"not written (the earlier checkpoints are kept)")
    files = {"lora.safetensors": save_safetensors(tensors), "optimizer.pt": _torch_bytes(opt_state),
             "scheduler.pt": _torch_bytes(schedule), "rng.pt": _torch_bytes(rng_state()),
             RUN_CONFIG: config_yaml.encode("utf-8"),
             TRAINER_STATE: json.dumps(trainer_state, indent=2).encode("utf-8")}
    manifest = {"files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                          for name, data in files.items()}}
    files[MANIFEST] = json.dumps(manifest, indent=2).encode("utf-8")
    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=out))
        os.chmod(tmp, default_mode(directory=True))
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes the checkpoint visible
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            old = out / f".old-checkpoint-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        tmp = None
        fsync_dir(out)
    except OSError as e:
        raise write_error(final, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if save_total_limit > 0:
        for old in list_checkpoints(out)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale(output_dir) -> List[str]:
    """Remove what saves cut short by a kill left in ``output_dir`` (``.checkpoint-N.*`` temp
    directories, temp files); a checkpoint caught mid-replacement (only ``.old-checkpoint-N``
    left) is put back. Call only while holding the run lock. Returns the names removed."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    gone = []
    for p in d.iterdir():
        m = re.match(r"^\.old-checkpoint-(\d+)$", p.name)
        if m and not (d / f"checkpoint-{m.group(1)}").exists():
            os.rename(p, d / f"checkpoint-{m.group(1)}")
        elif m or re.match(r"^\.checkpoint-\d+\.", p.name):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone + remove_temporaries(d)


def read_verified(path) -> Dict[str, bytes]:
    """Every file of checkpoint ``path`` as bytes, each checked against ``manifest.json``;
    CheckpointError (one line) names the first file that is missing or differs."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["files"]
        if not isinstance(entries, dict) or not entries:
            raise ValueError("no file list")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (an incomplete checkpoint, or one written by "
                              f"an older philora): its files cannot be verified") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {MANIFEST} is damaged: {first_line(e)}") from None
    files = {}
    for name, entry in entries.items():
        try:
            data = (path / name).read_bytes()
            ok = (len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"])
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {name} is missing") from None
        except (OSError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read {name}: {first_line(e)}") from None
        if not ok:
            raise CheckpointError(f"{path}: {name} is damaged (its size or sha256 differs from "
                                  f"{MANIFEST})")
        files[name] = data
    missing = {"lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", TRAINER_STATE} - set(files)
    if missing:
        raise CheckpointError(f"{path}: {MANIFEST} does not list {sorted(missing)[0]}")
    return files


def find_resumable(output_dir, log: Callable[[str], None] = print) -> Path:
    """The newest checkpoint in ``output_dir`` whose files match their manifest. Each damaged
    one on the way is reported in one line through ``log``; none usable is a CheckpointError."""
    d = Path(output_dir)  # every checkpoint-N directory: one that lost a file is reported too
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()] \
        if d.is_dir() else []
    ckpts = [p for _, p in sorted(found)]
    if not ckpts:
        raise CheckpointError(f"--resume: no complete checkpoint in '{output_dir}' to resume from")
    for i, ckpt in enumerate(reversed(ckpts)):
        try:
            read_verified(ckpt)
            return ckpt
        except CheckpointError as e:
            older = ckpts[-2 - i].name if i + 1 < len(ckpts) else None
            if older is None:
                raise CheckpointError(f"--resume: no usable checkpoint in '{output_dir}': {e}") from None
            log(f"philora: warning: {e}; resuming from {older} instead")
    raise AssertionError("unreachable")


def changed_settings(path, cfg: Config) -> List[tuple]:
    """The settings of ``cfg`` that differ from those checkpoint ``path`` was trained with
    (its config.yaml), as (key, old, new), leaving out config.RESUME_FREE. A key the
    checkpoint's config lacks (added to philora since) counts with its default."""
    try:
        saved = yaml.safe_load((Path(path) / RUN_CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: cannot read config.yaml: {first_line(e)}") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: config.yaml is not a mapping")
    defaults, now = _flat(config_to_dict(Config())), _flat(config_to_dict(cfg))
    before = {**defaults, **_flat(saved)}
    return [(k, before[k], v) for k, v in now.items() if k not in RESUME_FREE and before[k] != v]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix == "":
            out.update(_flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore LoRA tensors, optimizer and RNG from ``path``; returns trainer_state (its step sets
    the learning rate; scheduler.pt, older checkpoints' LambdaLR state included, is verified and
    read, not needed).

    Every file is verified against the manifest before anything is deserialised. The checkpoint
    must hold exactly this model's trainable tensors, with the same shapes (same peft_config),
    else CheckpointError names the checkpoint and the first difference.
    """
    path = Path(path)
    files = read_verified(path)
    try:
        tensors = load_safetensors(files["lora.safetensors"])
    except Exception as e:  # noqa: BLE001 (a verified file that still does not parse: one line)
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
    try:
        opt = torch.load(io.BytesIO(files["optimizer.pt"]), weights_only=True)
        torch.load(io.BytesIO(files["scheduler.pt"]), weights_only=True)
        rng = torch.load(io.BytesIO(files["rng.pt"]), weights_only=True)
        state = json.loads(files[TRAINER_STATE].decode("utf-8"))
    except Exception as e:  # noqa: BLE001 (incl. pickle.UnpicklingError for a non-weights pickle)
        raise CheckpointError(f"{path}: cannot restore the training state: {first_line(e)}") from None
    bad = nonfinite(tensors) or (nonfinite(_optimizer_tensors(opt)) if isinstance(opt, dict) else None)
    if bad:
        raise CheckpointError(f"{path}: '{bad}' holds NaN or infinite values")
    model.load_state_dict(tensors, strict=False)  # through the layers' own load hooks
    try:
        optimizer.load_state_dict(opt)
        set_rng_state(rng)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot restore the training state: {first_line(e)}") from None
    return state
