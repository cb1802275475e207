"""The model: the table of model knowledge, loading (with its tokenizer), LoRA injection and the
PEFT adapter format, every training patch (attention per packed conversation, LongRoPE, fused
autograd functions, 4-bit bases, DoRA, NEFTune), the loss, and decoding."""
