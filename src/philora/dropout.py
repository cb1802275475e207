"""LoRA's input dropout with a cheap mask on CPU.

Why hand-written: on CPU, ``nn.Dropout``'s mask comes from ``bernoulli_`` on torch's
single-threaded Mersenne Twister at ~7 ns per element. LoRA drops out the input of every
adapted layer (tokens x in_features each: 4 x tokens x 2.9k per Phi-3-shaped decoder layer), so
on a 2-core CPU the masks alone took ~15% of a training step, more than attention. Here the mask
comes from numpy's PCG64 (16-bit draws, ~4x cheaper) seeded from torch's RNG, so
``torch.manual_seed`` still reproduces a run, and only the boolean mask is kept for backward.

Same distribution as ``nn.Dropout`` up to p's rounding to a multiple of 1/65536 (the scale is
1/(1-p) of that rounded p, so the expectation is exact). On CUDA, in eval mode, at p=0,
without numpy, or below ``MIN_NUMEL`` elements (where either mask costs microseconds; so small
inputs draw exactly F.dropout's mask) it is ``nn.Dropout``. A subclass, so
``isinstance(m, nn.Dropout)`` still holds.
"""

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


def keep_mask(shape, p: float) -> torch.Tensor:
    """A boolean CPU tensor, True with probability 1 - round(p * 65536) / 65536."""
    import numpy as np
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # torch's RNG decides: manual_seed works
    bits = np.random.Generator(np.random.PCG64(seed)).integers(0, LEVELS, size=shape, dtype=np.uint16)
    return torch.from_numpy(bits >= round(p * LEVELS))


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    drop = round(p * LEVELS)
    return _Masked.apply(x, keep_mask(tuple(x.shape), p), LEVELS / (LEVELS - drop))


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
