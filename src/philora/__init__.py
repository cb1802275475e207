"""philora: fine-tune Phi-3 Mini (and other Hugging Face causal LMs) with LoRA on chat data."""

__version__ = "0.1.0"
