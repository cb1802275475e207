"""NEFTune (arXiv 2310.05914): uniform noise on the input embeddings while training.

``training_config.neftune_noise_alpha: a`` adds ``U(-m, m)`` to every input embedding, with
transformers' magnitude ``m = a / sqrt(L * d)`` (d the hidden size; transformers'
``neftune_post_forward_hook``). transformers takes L as the batch's padded width; here L is each
conversation's own length, so a conversation gets the noise it would get trained alone whatever
it is batched with: per row of a padded batch (its attention mask), per conversation of a packed
row (where its ``position_ids`` restart). Only in training mode: evaluation, the end-of-run
report and generation never see it.

Two hooks: a pre-hook on the decoder reads the call's ``position_ids`` / ``attention_mask``, and
a forward hook on the input embeddings adds the noise. Hand-written because transformers' hook
knows only the padded width, and philora packs.
"""

import math
from typing import Optional

import torch
import torch.nn as nn

from ..data.batching import conversation_starts


def sequence_lengths(position_ids: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """(rows, L) tensor: at each position, the length of the conversation it belongs to."""
    if position_ids is not None and position_ids.dim() == 2:
        segment = conversation_starts(position_ids).flatten().cumsum(0) - 1  # numbered across rows
        return torch.bincount(segment)[segment].view(position_ids.shape)
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.sum(-1, keepdim=True).clamp(min=1).expand_as(attention_mask)
    return None


class NEFTune:
    """Noise on ``model``'s input embeddings in training mode; ``remove()`` takes the hooks off."""

    def __init__(self, model: nn.Module, alpha: float):
        self.alpha = float(alpha)
        self.lengths: Optional[torch.Tensor] = None
        self.handles = [
            model.get_decoder().register_forward_pre_hook(self._read, with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(self._noise),
        ]

    def _read(self, module, args, kwargs):
        self.lengths = sequence_lengths(kwargs.get("position_ids"), kwargs.get("attention_mask"))

    def _noise(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        lengths, self.lengths = self.lengths, None
        rows, width, hidden = output.shape
        if lengths is None or tuple(lengths.shape) != (rows, width):  # no mask, no packing: the width
            m = self.alpha / math.sqrt(width * hidden)
            return output + torch.zeros_like(output).uniform_(-m, m)
        m = (self.alpha / torch.sqrt(lengths.to(torch.float32) * hidden)).to(output.device, output.dtype)[..., None]
        # uniform_(-m, m) computes u * 2m - m: the same, with m per position
        return output + torch.zeros_like(output).uniform_(0, 1) * (2 * m) - m

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
