"""LoRA for embeddings: loralib's ``Embedding``, with ``max_norm`` fixed (see ``layers.py``)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import LoRALayer


class Embedding(LoRALayer, nn.Embedding):
    """``nn.Embedding`` plus a low-rank update: ``E[x] + (A.T[x] @ B.T) * scaling``.

    Shapes: ``weight`` (num_embeddings, embedding_dim), ``lora_A`` (r, num_embeddings),
    ``lora_B`` (embedding_dim, r). Init as loralib: A zero, B normal (so the delta starts at 0).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: int = 1,
                 merge_weights: bool = True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0, merge_weights=merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self):
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _frozen_weight(self) -> torch.Tensor:
        return self.weight

    def delta_weight(self) -> torch.Tensor:
        """The update added to ``weight``: (num_embeddings, embedding_dim)."""
        return (self.lora_B @ self.lora_A).transpose(0, 1) * self.scaling

    def train(self, mode: bool = True):
        nn.Embedding.train(self, mode)
        self._lora_train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (...) integer ids -> (..., embedding_dim)."""
        result = nn.Embedding.forward(self, x)
        if self.has_lora() and not self.merged:
            # max_norm=None: F.embedding renormalises its weight *in place*; doing that to
            # lora_A (loralib) silently rewrites the adapter on every forward.
            after_A = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx, None,
                                  self.norm_type, self.scale_grad_by_freq, self.sparse)
            result = result + (F.linear(after_A, self.lora_B) * self.scaling).to(result.dtype)
        return result
