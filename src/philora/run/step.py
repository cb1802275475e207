"""One optimizer step: accumulate the micro-batches' gradients, clip, and update unless the step
is not finite.

The loss object is the seam between the loop and the objective: ``loss_fn(batch)`` returns
(sum of the token losses, number of label tokens), or for a preference objective (sum of the pair
losses, pairs), and nothing here knows more about it. Gradients are normalised by the count of
all micro-batches on all ranks, so every label token (pair) weighs the same (no mean of means).
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from . import distributed
from .batches import to_device
from .distributed import World


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did, on this rank."""
    loss: torch.Tensor  # sum of the token losses (float32, CPU)
    labels: torch.Tensor  # label tokens
    tokens: int  # tokens in the micro-batches
    norm: torch.Tensor  # the gradient norm before clipping
    bad: bool  # some rank's loss or gradient norm was NaN/inf: no update
    stop: bool  # some rank got SIGTERM/SIGINT: stop after this step


def accumulate(loss_fn, micro: List[Dict[str, torch.Tensor]], world: World, device,
               autocast: Callable) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward of each micro-batch: (loss sum, label tokens, tokens) on this rank."""
    # what the loss sums are normalised by: label tokens, or the pairs of a preference objective
    (n_labels,) = distributed.all_sum(world, sum(b.get("num_pairs", b["num_label_tokens"]) for b in micro))
    scale = world.size / n_labels.clamp(min=1).item()  # DDP averages over ranks: undo that
    total, labels, tokens = torch.zeros(()), torch.zeros(()), 0
    for i, b in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if (last or not world.enabled) else loss_fn.no_sync()
        with sync, autocast():
            loss_sum, n = loss_fn(to_device(b, device))
            (loss_sum.float() * scale).backward()
        total += loss_sum.detach().float().cpu()
        labels += n.cpu()
        tokens += int(b["num_tokens"])
    return total, labels, tokens


def optimizer_step(loss_fn, optimizer, params: List[torch.Tensor], micro: List[Dict[str, torch.Tensor]],
                   world: World, device, autocast: Callable, max_grad_norm: float,
                   stop_requested: Callable[[], bool]) -> StepResult:
    """One step over ``micro``; the optimizer's rates are already set for it."""
    loss, labels, tokens = accumulate(loss_fn, micro, world, device, autocast)
    # The norm is logged either way; max_grad_norm 0 means no clipping.
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    # One all-reduce for what every rank must decide alike: skip a step whose loss or gradient
    # is NaN/inf (no update: the weights and Adam's moments stay finite), and stop after this
    # step on SIGTERM/SIGINT.
    finite = math.isfinite(loss.item()) and math.isfinite(float(norm))
    bad, stop = distributed.all_sum(world, torch.tensor(float(not finite)), torch.tensor(float(stop_requested())))
    if not bad:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, labels, tokens, norm, bool(bad), bool(stop))
