"""Activation checkpointing when a micro-batch would not fit: ``model.gradient_checkpointing: auto``.

Before the first step, one forward pass of a short probe (``PROBE_TOKENS`` tokens of the
longest training conversation) runs under ``torch.autograd.graph.saved_tensors_hooks`` and
counts the bytes autograd keeps for backward (parameters excluded): activations per token,
measured on the model as it will train (its attention, dtype, LoRA layers), with no device
counter involved, so it is the same number on CPU and CUDA. The longest micro-batch the run can
see is the sum of its ``per_device_train_batch_size`` longest conversations (packed rows hold
exactly those tokens). Its estimated need, activations x ``HEADROOM`` (backward's transient
gradients; on CPU also the allocator's retention, measured at ~1.4x the live peak on the
benchmark) plus one chunk of LM-head logits, is compared with the memory free on the device
(CUDA: ``mem_get_info``; CPU: ``MemAvailable``). When it does not fit, checkpointing goes on
(transformers' ``gradient_checkpointing_enable``, non-reentrant), and the log says so with the
numbers; ``true`` / ``false`` force it. Hand-written: transformers and PEFT have no such switch.
"""

import contextlib
import heapq
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from ..data.batching import collate

PROBE_TOKENS = 256
HEADROOM = {"cuda": 1.3, "cpu": 2.0}  # need = activations x this + logits (module docstring)


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with frozen inputs)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def free_bytes(device: torch.device) -> int:
    """Memory a run can still take on ``device``: CUDA's free memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        import psutil
        return int(psutil.virtual_memory().available)


def saved_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``forward()`` runs
    (storages counted once, ``exclude``'s storages, e.g. parameters, not at all)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def longest_micro_batch(lengths: Iterable[int], batch: int) -> int:
    """Tokens in the largest possible micro-batch: the ``batch`` longest conversations."""
    return sum(heapq.nlargest(batch, lengths))


def decide(loss_fn: nn.Module, probe: Dict[str, torch.Tensor], tokens: int, device: torch.device,
           vocab: int, chunk: int, free: Optional[int] = None) -> Tuple[bool, str]:
    """(checkpointing needed?, one log line) for micro-batches of up to ``tokens`` tokens.

    ``probe``: a packed batch (input_ids, labels, position_ids) on ``device``; ``chunk``: the
    loss's LM-head rows per chunk. ``free`` defaults to :func:`free_bytes`."""
    n = int(probe["input_ids"].numel())
    params = list(loss_fn.parameters())
    per_token = saved_bytes(lambda: loss_fn(probe), params) / max(1, n)
    activations = per_token * tokens
    need = activations * HEADROOM.get(device.type, 1.3) + 2 * min(chunk, tokens) * vocab * 4
    free = free_bytes(device) if free is None else free
    gib = 2 ** 30
    on = need > free
    line = (f"model.gradient_checkpointing auto: the longest micro-batch ({tokens} tokens) needs "
            f"~{need / gib:.2f} GiB for activations ({per_token / 1024:.0f} KiB per token), "
            f"{free / gib:.2f} GiB free on {device.type}: checkpointing {'on' if on else 'off'}")
    return on, line


def plan(loss_fn: nn.Module, examples, batch_size: int, pad_id: int, device: torch.device,
         autocast: Callable = None) -> Tuple[bool, str]:
    """:func:`decide` for a run over ``examples`` (dicts with ``input_ids`` / ``labels``) in
    micro-batches of ``batch_size`` conversations; the probe is the start of the longest one."""
    lengths = [len(e["input_ids"]) for e in examples]
    tokens = longest_micro_batch(lengths, batch_size)
    longest = examples[max(range(len(lengths)), key=lengths.__getitem__)]
    n = min(PROBE_TOKENS, len(longest["input_ids"]))
    part = {"input_ids": list(longest["input_ids"][:n]), "labels": list(longest["labels"][:n])}
    probe = {k: v.to(device) for k, v in collate([part], pad_id, True, n).items()
             if k in ("input_ids", "labels", "position_ids")}
    head = loss_fn.model.get_output_embeddings()
    with (autocast or contextlib.nullcontext)():
        return decide(loss_fn, probe, tokens, device, head.weight.shape[0], loss_fn.chunk)
