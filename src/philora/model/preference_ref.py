"""DPO's reference without a second model: the step-0 model's log-probs, computed once and kept with the run.

    start_adapter(model, path, lora_dropout)      the LoRA starts from a saved adapter (peft_config.init_adapter)
    reference_table(model, pairs, ...)            -> (pairs, 2) summed completion log-probs, chosen / rejected
    with_reference(pairs, table)                  -> the pairs, each carrying its "ref" (collate_pairs batches it)
    save_reference(out, tables) / load_reference(out, sets) -> the run's ``reference_logps.safetensors``
    preference_accuracy(model, pairs, ...)        -> how often the model itself prefers chosen (report: base vs tuned)

The reference of DPO is the model at step 0: the base with the adapter at zero (a fresh LoRA's B is
zero), or the starting adapter (``init_adapter``: SFT, then DPO on the same adapter). Rather than a
second copy of the model, or swapping the step-0 LoRA tensors in for an extra forward pass every
step, its log-probs are computed once, before the first step, with the very model that trains (in
eval mode: no dropout, no gradients), for every train and eval pair: one forward pass per pair per
run (TRL's ``precompute_ref_log_probs``), where the per-step reference forward costs one per pair
per epoch. They are written to the run directory with a digest of the pairs' token ids, so a
resume reads the same numbers (the step-0 model is gone by then) and a resume on other data is
refused. Eval mode and packing make them equal what TRL computes with the adapter disabled (or its
frozen "ref" copy of the starting adapter) within float rounding (tests).
"""

import contextlib
import hashlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from ..core.diskio import write_bytes
from ..core.errors import PhiloraError
from ..data.preference import collate_pairs, sequences
from .inject import apply_adapter
from .preference import reference_logps, sequence_logps

REFERENCE_FILE = "reference_logps.safetensors"


def start_adapter(model: nn.Module, path, lora_dropout: float) -> dict:
    """Inject the adapter at ``path`` (its ranks, alphas, targets, DoRA) as the LoRA to train, with
    ``lora_dropout`` on its input; returns its adapter_config."""
    config = apply_adapter(model, path)
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_dropout") and lora_dropout > 0:
            module.lora_dropout = nn.Dropout(p=lora_dropout)
    return config


@torch.no_grad()
def reference_table(model: nn.Module, pairs: List[dict], pad_id: int, packing: bool, max_length: int,
                    batch_size: int, device, autocast: Callable = contextlib.nullcontext,
                    indices: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(len(pairs), 2) float64: the reference log-probs of the pairs at ``indices`` (default all; a
    rank's share under torchrun), zero elsewhere. ``model`` is the loss object's model, as it is at
    step 0; it is put in eval mode for the pass and back after."""
    table = torch.zeros((len(pairs), 2), dtype=torch.float64)
    indices = list(range(len(pairs))) if indices is None else list(indices)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(indices), batch_size):
            part = indices[s:s + batch_size]
            batch = collate_pairs([pairs[i] for i in part], pad_id, packing, max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                table[part] = reference_logps(model, batch)
    finally:
        model.train(was_training)
    return table


def with_reference(pairs: List[dict], table: torch.Tensor) -> List[dict]:
    """New pair dicts, each with its ``ref`` (chosen, rejected); the arrays are shared, not copied."""
    rows = table.tolist()
    return [{**p, "ref": tuple(r)} for p, r in zip(pairs, rows)]


def pairs_digest(pairs: List[dict]) -> str:
    """sha256 of the pairs' token ids and label masks, in order: which pairs a table belongs to."""
    h = hashlib.sha256()
    for p in pairs:
        for ids, mask in sequences(p):
            h.update(np.int64(len(ids)).tobytes())
            h.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
            h.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return h.hexdigest()


def save_reference(out, tables: Dict[str, torch.Tensor], sets: Dict[str, List[dict]]) -> Path:
    """Write the tables (e.g. {"train": ..., "eval": ...}) with their pairs' digests, atomically."""
    data = save_safetensors({k: v.detach().clone() for k, v in tables.items()},
                            metadata={f"{k}_digest": pairs_digest(sets[k]) for k in tables})
    return write_bytes(Path(out) / REFERENCE_FILE, data)


def load_reference(out, sets: Dict[str, List[dict]]) -> Optional[Dict[str, torch.Tensor]]:
    """The run's stored tables for ``sets``; None when the run has none (a new run). A table that
    does not belong to these pairs (the data changed) is a one-line PhiloraError."""
    path = Path(out) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tables = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (a damaged file: said in one line)
        raise PhiloraError(f"{path}: cannot read the stored reference log-probs ({type(e).__name__})") from None
    for name, pairs in sets.items():
        if name not in tables or meta.get(f"{name}_digest") != pairs_digest(pairs) or len(tables[name]) != len(pairs):
            raise PhiloraError(f"{path}: the stored DPO reference log-probs are for other {name} pairs than this "
                               f"run's (the data, tokenizer or max_length changed since the run began): resume "
                               f"with the run's own data, or start a new run")
    return tables


@torch.no_grad()
def preference_accuracy(model: nn.Module, pairs: List[dict], pad_id: int, packing: bool, max_length: int,
                        batch_size: int, device, autocast: Callable = contextlib.nullcontext) -> Dict[str, float]:
    """Reference-free: the share of ``pairs`` whose chosen completion the model gives a higher mean
    per-token log-probability than the rejected one (``preference_accuracy``), and the mean gap
    (``logp_margin``). Unlike rewards/accuracies (zero at step 0, where policy = reference and every
    pair ties) it compares base and tuned models alike; the caller sets eval mode / the adapter."""
    wins, gap = 0.0, 0.0
    for s in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[s:s + batch_size], pad_id, packing, max_length)
        with autocast():
            logps, counts, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        mean = (logps / counts.clamp(min=1)).double().cpu().view(-1, 2)
        wins += float((mean[:, 0] > mean[:, 1]).sum())
        gap += float((mean[:, 0] - mean[:, 1]).sum())
    n = max(len(pairs), 1)
    return {"preference_accuracy": wins / n, "logp_margin": gap / n}
