"""LoRA layers: a drop-in for microsoft/LoRA's ``loralib.layers`` (0.1.2).

Same class names, constructor signatures, defaults, parameter names, shapes and state-dict keys
as loralib, so checkpoints move between the two with ``load_state_dict(..., strict=False)``.
Same merge contract: with ``merge_weights=True`` the low-rank update is added into the frozen
weight on ``eval()`` and taken out again on ``train()``.

Where loralib is wrong, these layers are right (each has a test):

* dropout with p=0 is ``nn.Identity`` (loralib's lambda makes modules unpicklable);
* ``MergedLinear`` takes unequal slices (``split_sizes``, for grouped-query q/k/v), works with
  no enabled slice, and never builds the out x in delta in its forward pass;
* loading LoRA weights into a merged (eval-mode) layer takes the old delta out first;
* ``Embedding`` with ``max_norm`` never renormalises ``lora_A`` in place;
* the LoRA branch runs in the LoRA parameters' dtype, so fp32 adapters on a bf16 base work.

Written by hand because this is the product itself; only torch is imported. Dropout is
``nn.Dropout`` exactly as in loralib (same masks for the same seed); the training pipeline
swaps in a cheaper CPU mask (philora/model/dropout.py) when it injects these layers.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F



class LoRALayer:
    """Mixin (first in each layer's bases, so its state-dict hook runs before nn.Module's) holding the LoRA hyper-parameters shared by every layer (as in loralib).

    Attributes: ``r`` (rank), ``lora_alpha``, ``scaling = lora_alpha / r`` (set by layers with
    r > 0), ``lora_dropout`` (a module: ``nn.Dropout`` or ``nn.Identity``), ``merged`` and
    ``merge_weights``.
    """

    def __init__(self, r: int, lora_alpha: int, lora_dropout: float, merge_weights: bool):
        self.r = r
        self.lora_alpha = lora_alpha
        # A real module, not loralib's lambda: picklable, deep-copyable, and free at p=0.
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        if isinstance(self, nn.Module):
            self.register_load_state_dict_post_hook(_remerge_after_load)

    # -- shared merge bookkeeping -----------------------------------------------------------
    def _has_lora(self) -> bool:
        return self.r > 0 and hasattr(self, "lora_A")

    def _merge_delta(self, sign: float) -> None:
        """Add (sign=+1) or subtract (sign=-1) ``delta_weight()`` into the frozen weight."""
        weight = self._frozen_weight()
        with torch.no_grad():
            # Computed in fp32 and cast once, so a bf16 base loses one rounding, not two.
            delta = self.delta_weight().float() * sign
            weight.copy_((weight.float() + delta).to(weight.dtype))

    def _set_merged(self, want: bool) -> None:
        if want and not self.merged:
            if self._has_lora():
                self._merge_delta(+1.0)
            self.merged = True
        elif not want and self.merged:
            if self._has_lora():
                self._merge_delta(-1.0)
            self.merged = False

    def _lora_train(self, mode: bool) -> None:
        # loralib's contract: merge on eval(), unmerge on train(), only if merge_weights.
        if self.merge_weights:
            self._set_merged(not mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # loralib#190: loading new lora_A/lora_B into a merged layer left the old delta baked
        # into the weight. Unmerge with the old factors before loading; the post-load hook
        # merges again with the new ones once children (a conv's weight) are loaded too.
        self._remerge = self.merged
        self._set_merged(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _remerge_after_load(module, incompatible_keys) -> None:
    if getattr(module, "_remerge", False):
        module._set_merged(True)
    module._remerge = False


def _lora_branch(x: torch.Tensor, dropout: nn.Module, A: torch.Tensor) -> torch.Tensor:
    """``dropout(x) @ A.T`` in the LoRA dtype: (..., in) -> (..., r)."""
    return F.linear(dropout(x.to(A.dtype)), A)


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
        if self._has_lora() and not self.merged:
            # max_norm=None: F.embedding renormalises its weight *in place*; doing that to
            # lora_A (loralib) silently rewrites the adapter on every forward.
            after_A = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx, None,
                                  self.norm_type, self.scale_grad_by_freq, self.sparse)
            result = result + (F.linear(after_A, self.lora_B) * self.scaling).to(result.dtype)
        return result


class Linear(LoRALayer, nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``x W.T + b + (dropout(x) A.T B.T) * scaling``.

    Shapes: ``weight`` (out, in), or (in, out) when ``fan_in_fan_out`` (GPT-2's Conv1D layout);
    ``lora_A`` (r, in), ``lora_B`` (out, r). Init as loralib: A kaiming-uniform, B zero.
    Input (..., in) -> output (..., out).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _T(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    def _frozen_weight(self) -> torch.Tensor:
        return self.weight

    def delta_weight(self) -> torch.Tensor:
        """The update added to ``weight``, in ``weight``'s layout: (out, in) or (in, out)."""
        return self._T(self.lora_B @ self.lora_A) * self.scaling

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)
        self._lora_train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._T(self.weight), bias=self.bias)
        if self._has_lora() and not self.merged:
            result = result + self.lora_forward(x).to(result.dtype)
        return result

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch alone, in the LoRA dtype: (..., in) -> (..., out)."""
        # (x A.T) B.T: O(tokens * r * (in + out)); scaling applied on the r-wide tensor.
        return self._lora_out(_lora_branch(x, self.lora_dropout, self.lora_A) * self.scaling)

    def _lora_out(self, h: torch.Tensor) -> torch.Tensor:
        """(..., r), already scaled -> (..., out): the B half of the LoRA branch."""
        return F.linear(h, self.lora_B)


class MergedLinear(LoRALayer, nn.Linear):
    """A fused projection (e.g. q/k/v or gate/up) with LoRA on some of its output slices.

    The output is split into ``len(enable_lora)`` slices: equal, as in loralib, or of
    ``split_sizes`` rows (unequal slices: q/k/v with grouped-query attention). Slice ``i`` gets
    its own rank-r update when ``enable_lora[i]``.

    Shapes (k = number of enabled slices): ``lora_A`` (r*k, in), ``lora_B`` (rows of the
    enabled slices, r); rows of ``lora_A`` [i*r:(i+1)*r] pair with the i-th enabled slice of
    ``lora_B``. Input (..., in) -> output (..., out).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True,
                 split_sizes: Optional[Sequence[int]] = None, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        enable_lora = [bool(e) for e in enable_lora]
        if split_sizes is None:
            if out_features % len(enable_lora) != 0:
                raise ValueError("The length of enable_lora must divide out_features")
            split_sizes = [out_features // len(enable_lora)] * len(enable_lora)
        split_sizes = [int(s) for s in split_sizes]
        if len(split_sizes) != len(enable_lora) or sum(split_sizes) != out_features:
            raise ValueError(f"split_sizes {split_sizes} must have one entry per enable_lora "
                             f"entry ({len(enable_lora)}) and sum to out_features ({out_features})")
        self.enable_lora = enable_lora
        self.split_sizes = split_sizes
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            k = sum(enable_lora)
            rows = sum(s for s, e in zip(split_sizes, enable_lora) if e)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * k, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((rows, r)))
            self.scaling = self.lora_alpha / self.r
            self.weight.requires_grad = False
            # Non-persistent: loralib keeps this as a plain attribute, so it is no state-dict key.
            ind = torch.cat([torch.full((s,), e, dtype=torch.bool)
                             for s, e in zip(split_sizes, enable_lora)])
            self.register_buffer("lora_ind", ind.to(self.weight.device), persistent=False)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _T(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    def _frozen_weight(self) -> torch.Tensor:
        return self.weight

    def _slices(self):
        """Yield (out_start, out_size, a_rows, b_rows) for each enabled slice."""
        out0, b0, i = 0, 0, 0
        for size, on in zip(self.split_sizes, self.enable_lora):
            if on:
                yield out0, size, slice(i * self.r, (i + 1) * self.r), slice(b0, b0 + size)
                b0 += size
                i += 1
            out0 += size

    def delta_weight(self) -> torch.Tensor:
        """The update added to ``weight`` (zero rows for disabled slices), in its layout."""
        delta = self.lora_B.new_zeros((self.out_features, self.in_features))
        for out0, size, a, b in self._slices():
            delta[out0:out0 + size] = self.lora_B[b] @ self.lora_A[a]
        return self._T(delta) * self.scaling

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)
        self._lora_train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._T(self.weight), bias=self.bias)
        if not self._has_lora() or self.merged:
            return result
        return result + self.lora_forward(x).to(result.dtype)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch alone, in the LoRA dtype: (..., in) -> (..., out), zero on disabled slices."""
        # One matmul for all of A, then each slice's (tokens, r) @ (r, size): never the
        # out x in delta that loralib builds on every call (loralib#109).
        return self._lora_out(_lora_branch(x, self.lora_dropout, self.lora_A) * self.scaling)

    def _lora_out(self, h: torch.Tensor) -> torch.Tensor:
        """(..., r*k), already scaled -> (..., out): each enabled slice's B, zeros elsewhere."""
        parts = [(out0, size, F.linear(h[..., a], self.lora_B[b]))
                 for out0, size, a, b in self._slices()]
        if all(self.enable_lora):
            return torch.cat([p for _, _, p in parts], dim=-1)
        delta = h.new_zeros((*h.shape[:-1], self.out_features))
        for out0, size, p in parts:
            delta[..., out0:out0 + size] = p
        return delta
