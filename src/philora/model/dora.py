"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) on philora's LoRA layers, computed as PEFT does.

``peft_config.use_dora: true``: each adapted layer's weight becomes a magnitude per output row
times a direction, ``W' = m * (W + s B A) / ||W + s B A||`` (row-wise L2 norm), where ``m`` is
trained (``lora_magnitude_vector``, (out,) float32, starting at ``||W||`` so the model starts
unchanged) and the norm is a constant in backward (the paper's section 4.3; PEFT does the same).

Forward, as PEFT's ``DoraLinearLayer``: ``base(x) + (g - 1) * W x + g * s B A x`` with
``g = m / ||W + s B A||``. The LoRA branch is the fast path of ``lora.Linear`` (``x A.T`` then
``B`` on the r-wide tensor, never an (out, in) product per token); what DoRA adds is one norm of
an (out, in) matrix per layer and forward, whatever the number of tokens, and, in training with
``lora_dropout > 0``, a second base matmul (PEFT applies ``W`` again to the dropped-out input).
The norm is kept until A, B or W change, so accumulation, checkpointed recomputation and
generation (token by token) compute it once.

Per-slice LoRA (``fused_slices``, Phi-3's ``q_proj`` names) gets a magnitude for the enabled
slices' rows only; the others stay exactly the base. In the PEFT file the fused module gets one
(out,) vector, ``||W||`` on the untouched rows, which PEFT turns into a factor of exactly 1.
On a 4-bit base (QLoRA) the norm is taken of the dequantised weight, as PEFT does.

Hand-written: PEFT's DoRA wraps PEFT's own LoRA layers; these wrap philora's (``philora.lora``
stays a loralib drop-in, so DoRA lives here). A scaling of 0 (``report.lora_disabled``) turns
the whole adapter off, magnitude included: the base model, as PEFT's ``disable_adapter``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import lora
from ..core.errors import PhiloraError
from . import quant

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name: the key in adapter_model.safetensors too


class _DoRA:
    """Mixin placed before a philora LoRA layer class: adds the magnitude and DoRA's forward."""

    def _base_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in): dequantised on a 4-bit base."""
        base = getattr(self, "base_layer", None)
        if base is not None:
            return quant.dequantize_weight(base.weight)
        return self._T(self.weight)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = getattr(self, "base_layer", None)
        return base(x) if base is not None else F.linear(x, self._T(self.weight), bias=self.bias)

    @torch.no_grad()
    def full_weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, float32, (out,): zero update on rows without LoRA.
        In float32 whatever autocast says; one (out, in) float32 buffer at a time."""
        weight = self._base_weight()
        with torch.autocast(weight.device.type, enabled=False):
            summed = self._T(self.delta_weight()).float()
            summed += weight
            return torch.linalg.norm(summed, dim=1)

    def weight_norm(self) -> torch.Tensor:
        """The norm for the rows that have a magnitude (a constant: no gradient). Recomputed only
        when A, B or W changed (their in-place version counters, or new storage): once per
        optimizer step, not per micro-batch, checkpointed recomputation or generated token."""
        weight = getattr(self, "base_layer", self).weight
        key = tuple((t.data_ptr(), t._version) for t in (self.lora_A, self.lora_B, weight)) + (self.scaling,)
        if getattr(self, "_norm_key", None) != key:
            norm = self.full_weight_norm()
            self._norm = norm if self.dora_rows is None else norm[self.dora_rows]
            self._norm_key = key
        return self._norm

    def init_magnitude(self) -> None:
        """m = ||W + s B A|| (= ||W|| with B at zero): the layer starts as plain LoRA. After the
        factors, scaling and slice mask are set (inject.lora_layer)."""
        ind = getattr(self, "lora_ind", None)
        rows = None if ind is None or bool(ind.all()) else ind.nonzero()[:, 0]
        full = self.full_weight_norm()
        # Buffers (not saved): they follow the layer to its device. The rows with a magnitude
        # (None: all), and ||W|| of the others, which PEFT's file needs (never recomputed from a
        # weight that FSDP may have sharded by then).
        self.register_buffer("dora_rows", rows, persistent=False)
        self.register_buffer("base_norm", None if rows is None else full, persistent=False)
        m = full if rows is None else full[rows]
        self.lora_magnitude_vector = nn.Parameter(m.to(self.lora_A.dtype))

    def peft_magnitude(self) -> torch.Tensor:
        """The (out,) vector PEFT stores for this module: m, and ||W|| on rows without LoRA."""
        m = self.lora_magnitude_vector.detach().float()
        if self.dora_rows is None:
            return m.clone()
        full = self.base_norm.clone()
        full[self.dora_rows] = m
        return full

    def _merge_delta(self, sign: float) -> None:
        raise PhiloraError("a DoRA layer cannot take its update into the weight in place; "
                           "merge with `philora merge`")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._base_forward(x)
        if not self._has_lora() or self.merged or not self.scaling:
            return result
        g = self.lora_magnitude_vector / self.weight_norm()
        if self.dora_rows is not None:  # factor 1 on rows without LoRA
            g = g.new_ones(self.out_features).index_put((self.dora_rows,), g)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)  # PEFT: W and the LoRA branch both see the dropped-out input
            base = F.linear(x, self._base_weight().to(x.dtype))
        else:
            base = result if self.bias is None else result - self.bias
        lora_out = self._lora_out(F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scaling)
        return result + ((g - 1) * base.to(g.dtype) + g * lora_out).to(result.dtype)


class Linear(_DoRA, lora.Linear):
    """``lora.Linear`` with DoRA's magnitude."""


class MergedLinear(_DoRA, lora.MergedLinear):
    """``lora.MergedLinear`` (LoRA on some slices of a fused projection) with DoRA's magnitude."""


class Linear4bit(_DoRA, quant.Linear4bitLoRA):
    """``quant.Linear4bitLoRA`` (QLoRA) with DoRA's magnitude."""


class MergedLinear4bit(_DoRA, quant.MergedLinear4bitLoRA):
    """``quant.MergedLinear4bitLoRA`` with DoRA's magnitude."""


def dora_class(cls: type) -> type:
    """The DoRA version of a philora LoRA layer class."""
    classes = {lora.Linear: Linear, lora.MergedLinear: MergedLinear,
               quant.Linear4bitLoRA: Linear4bit, quant.MergedLinear4bitLoRA: MergedLinear4bit}
    if cls in classes:
        return classes[cls]
    raise PhiloraError(f"peft_config.use_dora: DoRA is not available for {cls.__name__} layers")
