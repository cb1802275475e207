"""LoRA's input dropout with a cheap mask on CPU.

Why hand-written: on CPU, ``nn.Dropout``'s mask comes from ``bernoulli_`` on torch's
single-threaded Mersenne Twister at ~7-16 ns per element (``F.dropout``: ~24 ns, measured). LoRA drops out the input of every
adapted layer (tokens x in_features each: 4 x tokens x 2.9k per Phi-3-shaped decoder layer), so
on a 2-core CPU the masks alone took ~15% of a training step, more than attention. Here the mask
comes from numpy's PCG64, its raw 64-bit words cut into four 16-bit draws (~0.8 ns per element,
~20x cheaper; ``Generator.integers`` took 1.8 ns), seeded from torch's RNG, so ``torch.manual_seed`` still reproduces a run, and the
same seed redraws the same mask: fused.py keeps the seed for backward instead of the mask.

Same distribution as ``nn.Dropout`` up to p's rounding to a multiple of 1/65536 (the scale is
1/(1-p) of that rounded p, so the expectation is exact). On CUDA, in eval mode, at p=0,
without numpy, or below ``MIN_NUMEL`` elements (where either mask costs microseconds; so small
inputs draw exactly F.dropout's mask) the module is ``nn.Dropout``. A subclass, so
``isinstance(m, nn.Dropout)`` still holds.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

LEVELS = 65536
MIN_NUMEL = 65536


class _Masked(torch.autograd.Function):
    """x * keep * scale, saving only the boolean mask."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def draw_seed() -> int:
    """A mask seed from torch's RNG (so ``torch.manual_seed`` decides every mask)."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


def keep_scale(p: float) -> float:
    """1 / (1 - p) for p rounded to a multiple of 1/65536, as :func:`keep_mask` draws it."""
    return LEVELS / (LEVELS - round(p * LEVELS))


def keep_mask(shape, p: float, seed: Optional[int] = None) -> torch.Tensor:
    """A boolean CPU tensor, True with probability 1 - round(p * 65536) / 65536; the same
    ``seed`` gives the same mask (default: a new seed from torch's RNG)."""
    import numpy as np
    seed = draw_seed() if seed is None else seed
    n = math.prod(shape)
    # PCG64's raw 64-bit words cut into four uniform 16-bit draws: ~2x cheaper than integers().
    raw = np.random.PCG64(seed).random_raw((n + 3) // 4)
    bits = raw.view(np.uint16)[:n].reshape(shape)
    return torch.from_numpy(bits >= round(p * LEVELS))


def mask(x: torch.Tensor, p: float, seed: Optional[int] = None) -> Tuple[torch.Tensor, float, Optional[int]]:
    """(keep, scale, seed) with ``x * keep * scale`` the dropped-out ``x``.

    On CPU, :func:`keep_mask` as uint8 (a float-by-uint8 multiply is ~2x faster than by bool);
    pass the returned seed to draw the same mask again. Elsewhere, ``nn.Dropout``'s own draws
    (``native_dropout``, what ``F.dropout`` runs on CUDA), and seed None."""
    if x.device.type == "cpu":
        seed = draw_seed() if seed is None else seed
        return keep_mask(tuple(x.shape), p, seed).view(torch.uint8), keep_scale(p), seed
    return torch.native_dropout(x, p, True)[1], 1.0 / (1.0 - p), None


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return _Masked.apply(x, keep_mask(tuple(x.shape), p), keep_scale(p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` with :func:`cpu_dropout` in training on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace
                or x.numel() < MIN_NUMEL):
            return super().forward(x)
        try:
            import numpy  # noqa: F401
        except ImportError:
            return super().forward(x)
        return cpu_dropout(x, self.p)
