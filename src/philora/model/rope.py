"""LongRoPE per conversation: every packed conversation gets the rotary factors it gets alone.

LongRoPE models (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) carry two sets of rotary factors.
transformers picks one per forward: the long set when the largest position id + 1 exceeds
``original_max_position_embeddings`` (the switch), else the short set. Run alone, a conversation
of n tokens therefore uses the long set iff n > switch. In a packed (or padded) batch the largest
position belongs to the longest conversation, so one long conversation would move every other
conversation in the forward to the long factors: rotary angles they never see at inference.

:func:`install` wraps the model's rotary module so that each conversation (a run of positions
counting up by one: ``data/batching.conversation_starts``) gets its own set. The wrapper calls the
model's own rotary module, at most twice: once with the long conversations' positions zeroed (the
largest position left is a short conversation's, so the short set is chosen) and once as given
(the long set); each token takes the cos/sin of its conversation's set. A batch on one side of the switch is a
single call, exactly as before. Nothing about the factors is re-implemented here.
Hand-written: transformers has no per-sequence choice of rotary factors.
"""

from typing import Optional

import torch
import torch.nn as nn

from ..data.batching import conversation_starts
from .families import longrope_switch


def span_ends(position_ids: torch.Tensor) -> torch.Tensor:
    """For each token, the last position id of its run (positions counting up by one) + 1: the
    length of its conversation in a packed row, or how far a decoding step has come."""
    pos = position_ids
    run = conversation_starts(pos).long().cumsum(-1) - 1  # run index of every token
    last = torch.zeros_like(pos).scatter_reduce(-1, run, pos, reduce="amax", include_self=False)
    return last.gather(-1, run) + 1


class PerConversationRoPE(nn.Module):
    """The model's rotary module, choosing LongRoPE's factor set per conversation."""

    def __init__(self, rotary: nn.Module, switch: int):
        super().__init__()
        self.rotary = rotary
        self.switch = switch

    def forward(self, x, position_ids, *args, **kwargs):
        long = span_ends(position_ids) > self.switch
        if not bool(long.any()) or bool(long.all()):
            return self.rotary(x, position_ids, *args, **kwargs)
        short = self.rotary(x, position_ids.masked_fill(long, 0), *args, **kwargs)
        full = self.rotary(x, position_ids, *args, **kwargs)
        pick = long[..., None]
        return tuple(torch.where(pick, f, s) for f, s in zip(full, short))


def install(model: nn.Module) -> Optional[int]:
    """Wrap the rotary module(s) of a LongRoPE model in place; returns the switch (None, and
    nothing changed, for other models). Idempotent."""
    switch = longrope_switch(getattr(model, "config", None))
    if switch is None:
        return None
    for name, module in list(model.named_modules()):
        if isinstance(module, PerConversationRoPE) or getattr(module, "rope_type", None) != "longrope":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, PerConversationRoPE):
            continue
        setattr(parent, child, PerConversationRoPE(module, switch))
    return switch
