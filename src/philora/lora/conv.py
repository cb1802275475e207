"""LoRA for convolutions: loralib's ``ConvLoRA`` / ``Conv1d`` / ``Conv2d`` / ``Conv3d``, fixed.

The frozen conv lives in ``self.conv`` (state-dict keys ``conv.weight``, ``conv.bias``) next to
``lora_A`` / ``lora_B``, as in loralib. The update ``(lora_B @ lora_A) * scaling`` is reshaped to
the conv weight's shape ``(out, in/groups, *kernel)``.

loralib sizes the factors as ``A: (r*k, in*k)``, ``B: (out/groups*k, r*k)``, which has exactly
the weight's number of elements only for a square 2-d kernel (microsoft/LoRA#115: Conv1d and
Conv3d break for kernel > 1). Here, with ``kernel = (k0, k1, ...)``::

    A: (r * k0, in * k1 * k2 ...)        B: (out / groups * k0, r * k0)

which is loralib's shape whenever loralib works (square 2-d kernels, 1-d/3-d kernel 1) and
right for every other kernel, tuple kernels and groups too. Dropout (ignored by loralib) is
applied to the LoRA branch's input.
"""

import math

import torch
import torch.nn as nn

from .layers import LoRALayer


class ConvLoRA(LoRALayer, nn.Module):
    """A frozen ``conv_module`` plus a low-rank weight update.

    Input/output as the wrapped conv: (N, in, *spatial) -> (N, out, *spatial').
    """

    def __init__(self, conv_module, in_channels: int, out_channels: int, kernel_size, r: int = 0,
                 lora_alpha: int = 1, lora_dropout: float = 0.0, merge_weights: bool = True,
                 **kwargs):
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        kernel = self.conv.kernel_size  # always a tuple, one entry per spatial dim
        k0, rest = kernel[0], math.prod(kernel[1:])
        if r > 0:
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * k0, in_channels * rest)))
            self.lora_B = nn.Parameter(
                self.conv.weight.new_zeros((out_channels // self.conv.groups * k0, r * k0)))
            self.scaling = self.lora_alpha / self.r
            self.conv.weight.requires_grad = False
        self.reset_parameters()
        self.merged = False

    def reset_parameters(self):
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _frozen_weight(self) -> torch.Tensor:
        return self.conv.weight

    def delta_weight(self) -> torch.Tensor:
        """The update added to ``conv.weight``: (out, in/groups, *kernel)."""
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        self._lora_train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lora() or self.merged:
            return self.conv(x)
        delta = self.delta_weight().to(self.conv.weight.dtype)
        if isinstance(self.lora_dropout, nn.Identity):
            # No dropout: one convolution with the updated weight (loralib's fast form).
            return self.conv._conv_forward(x, self.conv.weight + delta, self.conv.bias)
        # Dropout touches only the LoRA branch's input, as in Linear: two convolutions.
        base = self.conv._conv_forward(x, self.conv.weight, self.conv.bias)
        return base + self.conv._conv_forward(self.lora_dropout(x), delta, None)


class Conv1d(ConvLoRA):
    """``nn.Conv1d`` with LoRA: ``Conv1d(in, out, kernel_size, r=0, lora_alpha=1, ...)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    """``nn.Conv2d`` with LoRA: ``Conv2d(in, out, kernel_size, r=0, lora_alpha=1, ...)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    """``nn.Conv3d`` with LoRA: ``Conv3d(in, out, kernel_size, r=0, lora_alpha=1, ...)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)
