"""LoRA layers: a drop-in for microsoft/LoRA's ``loralib.layers`` (0.1.2), and the one LoRA linear layer.

:class:`LoRALinear` is every LoRA linear layer philora has; what varies is an option of the one
class (torchtune's LoRALinear and DoRALinear, in one):

* the base: a plain linear layer's weight and bias become the layer's own ``weight`` / ``bias``
  (loralib's keys; not copied), or, with ``dequantize``, a quantized module (bitsandbytes 4-bit)
  stays whole as ``base_layer``: its forward runs, its packed weight is never written (no
  in-place merge), and ``dequantize(base_layer.weight)`` gives DoRA the plain weight;
* ``enable_lora`` / ``split_sizes``: LoRA on some slices of a fused output (q/k/v, gate/up);
* ``use_rslora``: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``;
* ``use_dora``: DoRA (arXiv 2402.09353) as PEFT computes it: ``W' = m * (W + s B A) / ||W + s B A||``
  per output row, ``m`` trained (``lora_magnitude_vector``, PEFT's name, starting at ``||W||``),
  the norm a constant in backward (the paper's section 4.3) and kept until A, B or W change; on
  slices only the enabled rows get a magnitude;
* ``fast_path``: a training forward that saves less for backward (philora/model/fused.py sets
  it, so this module stays pure torch), tried before the plain path.

:class:`Linear` and :class:`MergedLinear` are loralib's constructors onto it: the same signatures,
defaults, parameter names, shapes, state-dict keys and random draws as loralib, so checkpoints move
between the two with ``load_state_dict(..., strict=False)``. Same merge contract: with
``merge_weights=True`` the update is added into the frozen weight on ``eval()`` and taken out
again on ``train()``.

Where loralib is wrong, philora.lora is right (each has a test):

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
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude: PEFT's parameter name and adapter-file key
Block = Tuple[int, int, slice, slice]  # (output start, output size, rows of lora_A, rows of lora_B)


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
    def has_lora(self) -> bool:
        """Whether the layer has LoRA factors (r > 0 and, for slices, one enabled)."""
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
            if self.has_lora():
                self._merge_delta(+1.0)
            self.merged = True
        elif not want and self.merged:
            if self.has_lora():
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


class LoRALinear(LoRALayer, nn.Module):
    """A frozen linear base plus a low-rank update, on its whole output or on some slices of it:
    ``base(x) + (dropout(x) A.T B_i.T) * scaling`` on the rows of each enabled slice i.

    Shapes: own ``weight`` (out, in), or (in, out) with ``fan_in_fan_out`` (GPT-2's Conv1D
    layout); ``lora_A`` (r*k, in) and ``lora_B`` (rows of the k enabled slices, r), k = 1 on the
    whole output; rows [i*r, (i+1)*r) of ``lora_A`` pair with the i-th enabled slice of
    ``lora_B``. Init as loralib: A kaiming-uniform, B zero. Input (..., in) -> output (..., out).
    On a quantized base (``dequantize`` given) ``weight`` and ``bias`` are ``base_layer``'s.
    """

    def __init__(self, base_layer: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                 fan_in_fan_out: bool = False, merge_weights: bool = True,
                 enable_lora: Optional[Sequence[bool]] = None, split_sizes: Optional[Sequence[int]] = None,
                 use_rslora: bool = False, use_dora: bool = False,
                 dequantize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 lora_dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.fan_in_fan_out, self.use_rslora, self.use_dora = fan_in_fan_out, use_rslora, use_dora
        self.dequantize = dequantize
        self.fast_path: Optional[Callable[["LoRALinear", torch.Tensor], Optional[torch.Tensor]]] = None
        if dequantize is None:  # registered first: loralib's key order (weight, bias, lora_A, lora_B)
            self.base_layer = None
            self.weight = base_layer.weight
            self.register_parameter("bias", base_layer.bias)
            rows, cols = self.weight.shape
            self.in_features, self.out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
        else:
            self.base_layer = base_layer
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.enable_lora, self.split_sizes = _slices(self.out_features, enable_lora, split_sizes)
        if r > 0 and (self.enable_lora is None or any(self.enable_lora)):
            self._add_factors(lora_dtype)

    def _add_factors(self, lora_dtype: Optional[torch.dtype]) -> None:
        """lora_A, lora_B (in ``lora_dtype``, default the base weight's; float32 on a packed one),
        scaling, the rows carrying LoRA, and with DoRA the magnitude."""
        weight, whole = self.weight, self.enable_lora is None
        dtype = lora_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        k = 1 if whole else sum(self.enable_lora)
        rows = self.out_features if whole else sum(s for s, e in zip(self.split_sizes, self.enable_lora) if e)
        self.lora_A = nn.Parameter(torch.zeros((self.r * k, self.in_features), dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros((rows, self.r), dtype=dtype, device=weight.device))
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        if self.base_layer is None:
            self.weight.requires_grad = False
        if not whole:  # non-persistent: loralib keeps this as a plain attribute, no state-dict key
            ind = torch.cat([torch.full((s,), e, dtype=torch.bool)
                             for s, e in zip(self.split_sizes, self.enable_lora)])
            self.register_buffer("lora_ind", ind.to(weight.device), persistent=False)
        self.reset_lora_parameters()
        if self.use_dora:  # after the factors, scaling and rows it is computed from
            self.init_magnitude()

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform, B zero (loralib's and PEFT's init): the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            # A quantized base's weight and bias are base_layer's, as PEFT's layers answer.
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name not in ("weight", "bias"):
                raise
            return getattr(base, name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"

    def _T(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    def _frozen_weight(self) -> torch.Tensor:
        if self.use_dora:
            raise ValueError("a DoRA layer cannot take its update into the weight in place; "
                             "merge with `philora merge`")
        if self.base_layer is not None:
            raise ValueError("cannot merge LoRA into a quantized base layer in place; merge with "
                             "`philora merge` (it dequantises the base first)")
        return self.weight

    def dense_weight(self) -> torch.Tensor:
        """The frozen weight as a plain (out, in) tensor: dequantised on a quantized base."""
        if self.base_layer is not None:
            return self.dequantize(self.base_layer.weight)
        return self._T(self.weight)

    def blocks(self) -> List[Block]:
        """The LoRA blocks: one on the whole output, or one per enabled slice."""
        if self.enable_lora is None:
            return [(0, self.out_features, slice(0, self.lora_A.shape[0]), slice(0, self.out_features))]
        out, out0, b0, i = [], 0, 0, 0
        for size, on in zip(self.split_sizes, self.enable_lora):
            if on:
                out.append((out0, size, slice(i * self.r, (i + 1) * self.r), slice(b0, b0 + size)))
                b0 += size
                i += 1
            out0 += size
        return out

    def delta_weight(self) -> torch.Tensor:
        """The update added to ``weight`` (zero rows for disabled slices), in its layout."""
        if self.enable_lora is None:
            return self._T(self.lora_B @ self.lora_A) * self.scaling
        delta = self.lora_B.new_zeros((self.out_features, self.in_features))
        for out0, size, a, b in self.blocks():
            delta[out0:out0 + size] = self.lora_B[b] @ self.lora_A[a]
        return self._T(delta) * self.scaling

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        self._lora_train(mode)
        return self

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base alone: (..., in) -> (..., out)."""
        if self.base_layer is not None:
            return self.base_layer(x)
        return F.linear(x, self._T(self.weight), bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_dora:
            return self.dora_forward(x)
        if self.fast_path is not None:
            y = self.fast_path(self, x)  # None outside training: then the plain path below
            if y is not None:
                return y
        result = self.base_forward(x)
        if self.has_lora() and not self.merged:
            result = result + self.lora_forward(x).to(result.dtype)
        return result

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch alone, in the LoRA dtype: (..., in) -> (..., out), zero on disabled slices."""
        # (x A.T) B.T: O(tokens * r * (in + out)); scaling applied on the r-wide tensor.
        h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return self._lora_out(h * self.scaling)

    def _lora_out(self, h: torch.Tensor) -> torch.Tensor:
        """(..., r*k), already scaled -> (..., out): each enabled slice's B, zeros elsewhere."""
        if self.enable_lora is None:
            return F.linear(h, self.lora_B)
        # Each slice's (tokens, r) @ (r, size): never the out x in delta that loralib builds
        # on every call (loralib#109).
        parts = [(out0, size, F.linear(h[..., a], self.lora_B[b])) for out0, size, a, b in self.blocks()]
        if all(self.enable_lora):
            return torch.cat([p for _, _, p in parts], dim=-1)
        delta = h.new_zeros((*h.shape[:-1], self.out_features))
        for out0, size, p in parts:
            delta[..., out0:out0 + size] = p
        return delta


    # -- DoRA (use_dora) ---------------------------------------------------------------------
    def init_magnitude(self) -> None:
        """m = ||W + s B A|| per output row (= ||W|| with B at zero): the layer starts as plain LoRA."""
        ind = getattr(self, "lora_ind", None)
        rows = None if ind is None or bool(ind.all()) else ind.nonzero()[:, 0]
        full = self.full_weight_norm()
        # Buffers (not saved): they follow the layer to its device. The rows with a magnitude
        # (None: all), and ||W|| of the others, which PEFT's file needs (never recomputed from a
        # weight that FSDP may have sharded by then).
        self.register_buffer("dora_rows", rows, persistent=False)
        self.register_buffer("base_norm", None if rows is None else full, persistent=False)
        m = full if rows is None else full[rows]
        self.register_parameter(MAGNITUDE, nn.Parameter(m.to(self.lora_A.dtype)))

    @torch.no_grad()
    def full_weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, float32, (out,): zero update on rows without LoRA.
        In float32 whatever autocast says; one (out, in) float32 buffer at a time."""
        weight = self.dense_weight()
        with torch.autocast(weight.device.type, enabled=False):
            summed = self._T(self.delta_weight()).float()
            summed += weight
            return torch.linalg.norm(summed, dim=1)

    def weight_norm(self) -> torch.Tensor:
        """The norm for the rows that have a magnitude (a constant: no gradient). Recomputed only
        when A, B or W changed (their in-place version counters, or new storage): once per
        optimizer step, not per micro-batch, checkpointed recomputation or generated token."""
        key = tuple((t.data_ptr(), t._version) for t in (self.lora_A, self.lora_B, self.weight)) + (self.scaling,)
        if getattr(self, "_norm_key", None) != key:
            norm = self.full_weight_norm()
            self._norm = norm if self.dora_rows is None else norm[self.dora_rows]
            self._norm_key = key
        return self._norm

    def peft_magnitude(self) -> torch.Tensor:
        """The (out,) vector PEFT stores for this layer: m, and ||W|| on rows without LoRA."""
        m = self.lora_magnitude_vector.detach().float()
        if self.dora_rows is None:
            return m.clone()
        full = self.base_norm.clone()
        full[self.dora_rows] = m
        return full

    def dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA: base(x) + (g - 1) W x + g s B A x, g = m / ||W + s B A|| (1 on rows
        without LoRA). A scaling of 0 is the base model, magnitude included."""
        result = self.base_forward(x)
        if not self.has_lora() or self.merged or not self.scaling:
            return result
        g = self.lora_magnitude_vector / self.weight_norm()
        if self.dora_rows is not None:
            g = g.new_ones(self.out_features).index_put((self.dora_rows,), g)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)  # PEFT: W and the LoRA branch both see the dropped-out input
            base = F.linear(x, self.dense_weight().to(x.dtype))
        else:
            base = result if self.bias is None else result - self.bias
        lora_out = self._lora_out(F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scaling)
        return result + ((g - 1) * base.to(g.dtype) + g * lora_out).to(result.dtype)

def _slices(out_features: int, enable_lora: Optional[Sequence[bool]],
            split_sizes: Optional[Sequence[int]]) -> Tuple[Optional[List[bool]], Optional[List[int]]]:
    """(enable_lora, split_sizes) as lists, checked; (None, None) for LoRA on the whole output.
    Without split_sizes the slices are equal, as in loralib."""
    if enable_lora is None:
        return None, None
    enable_lora = [bool(e) for e in enable_lora]
    if split_sizes is None:
        if out_features % len(enable_lora) != 0:
            raise ValueError("The length of enable_lora must divide out_features")
        split_sizes = [out_features // len(enable_lora)] * len(enable_lora)
    split_sizes = [int(s) for s in split_sizes]
    if len(split_sizes) != len(enable_lora) or sum(split_sizes) != out_features:
        raise ValueError(f"split_sizes {split_sizes} must have one entry per enable_lora "
                         f"entry ({len(enable_lora)}) and sum to out_features ({out_features})")
    return enable_lora, split_sizes


def _loralib_base(in_features: int, out_features: int, fan_in_fan_out: bool, kwargs) -> nn.Linear:
    """loralib's frozen ``nn.Linear`` (kwargs: bias, device, dtype)."""
    base = nn.Linear(in_features, out_features, **kwargs)
    # loralib initialises it twice (nn.Linear.__init__, then its own reset_parameters before
    # lora_A): the same draws, so the same seed gives loralib's weights and factors.
    base.reset_parameters()
    if fan_in_fan_out:  # stored (in, out), as loralib does for GPT-2's Conv1D weights
        base.weight.data = base.weight.data.transpose(0, 1)
    return base


class Linear(LoRALinear):
    """loralib's ``Linear``: an ``nn.Linear`` (``**kwargs``: bias, device, dtype) with LoRA on
    its whole output. Only a constructor: the layer is :class:`LoRALinear`."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        super().__init__(_loralib_base(in_features, out_features, fan_in_fan_out, kwargs), r=r,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         fan_in_fan_out=fan_in_fan_out, merge_weights=merge_weights)


class MergedLinear(LoRALinear):
    """loralib's ``MergedLinear``: a fused projection (q/k/v, gate/up) with LoRA on the slices
    ``enable_lora`` marks: ``len(enable_lora)`` equal slices as in loralib, or slices of
    ``split_sizes`` rows (grouped-query q/k/v). Only a constructor: the layer is :class:`LoRALinear`."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True,
                 split_sizes: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(_loralib_base(in_features, out_features, fan_in_fan_out, kwargs), r=r,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         fan_in_fan_out=fan_in_fan_out, merge_weights=merge_weights,
                         enable_lora=enable_lora, split_sizes=split_sizes)
