"""philora.lora: a drop-in for microsoft/LoRA's ``loralib`` (``import philora.lora as lora``),
and philora's one LoRA linear layer, :class:`LoRALinear`.

Pure torch. See ``layers.py`` for what is fixed relative to loralib 0.1.2.
"""

from .conv import Conv1d, Conv2d, Conv3d, ConvLoRA
from .embedding import Embedding
from .layers import MAGNITUDE, Linear, LoRALayer, LoRALinear, MergedLinear
from .utils import lora_layers, lora_state_dict, mark_only_lora_as_trainable

__all__ = [
    "LoRALayer", "LoRALinear", "Embedding", "Linear", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d",
    "Conv3d", "MAGNITUDE", "mark_only_lora_as_trainable", "lora_state_dict", "lora_layers",
]
