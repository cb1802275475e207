"""The optimizer (AdamW over the trainable tensors, LoRA+ groups) and the advice given before training.

LoRA+ (arXiv 2402.12354, ``peft_config.loraplus_lr_ratio: R``): ``lora_B`` learns R times as fast
as ``lora_A``. The groups are PEFT's ``create_loraplus_optimizer``'s, so a config moves over
unchanged: A (and any other matrix) at the learning rate; ``lora_B`` and every 1-D tensor (DoRA's
magnitude, biases) at R times it, with weight decay except on biases and LayerNorm parameters
(``training_config.weight_decay`` stands for PEFT's ``loraplus_weight_decay``). The schedule
multiplies every group's rate alike, so the ratio holds at every step, and the groups' rates
are part of the optimizer and scheduler states a checkpoint restores. Without LoRA+ there is one
group, as before. Hand-written (a dozen lines) because PEFT's function takes a PeftModel.
"""

from typing import List

import torch
import torch.nn as nn

from ..core.config import Config

USUAL_LORA_LR = (5e-5, 5e-4)  # the usual LoRA range (PEFT / TRL examples, LoRA Without Regret)
LOW_LR = 1e-5  # below this, LoRA barely moves (the Phi-3 cookbook's 5e-6 is a full fine-tuning rate)
LARGE_BATCH = 32  # LoRA loses to full fine-tuning at large batches (LoRA Without Regret)


def param_groups(model: nn.Module, cfg: Config) -> List[dict]:
    """AdamW parameter groups of ``model``'s trainable tensors: one, or LoRA+'s (PEFT's rules)."""
    tc, ratio = cfg.training_config, cfg.peft_config.loraplus_lr_ratio
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if ratio is None:
        return [{"params": [p for _, p in named]}]
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, p in named:
        if "lora_B" in name or p.ndim == 1:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            no_decay = "bias" in name or isinstance(parent, nn.LayerNorm)
            groups["B_no_decay" if no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    lr = tc.learning_rate
    return [g for g in ({"params": groups["A"], "lr": lr, "weight_decay": tc.weight_decay},
                        {"params": groups["B"], "lr": lr * ratio, "weight_decay": tc.weight_decay},
                        {"params": groups["B_no_decay"], "lr": lr * ratio, "weight_decay": 0.0})
            if g["params"]]


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the config's hyper-parameters over :func:`param_groups`."""
    tc = cfg.training_config
    return torch.optim.AdamW(param_groups(model, cfg), lr=tc.learning_rate,
                             betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon,
                             weight_decay=tc.weight_decay)


def advice(cfg: Config, world_size: int) -> List[str]:
    """Warnings a careful user would want before a LoRA run starts (one line each)."""
    tc, pc = cfg.training_config, cfg.peft_config
    out = []
    if tc.learning_rate < LOW_LR:
        out.append(f"training_config.learning_rate {tc.learning_rate:g} is far below the usual LoRA range "
                   f"({USUAL_LORA_LR[0]:g} to {USUAL_LORA_LR[1]:g}); LoRA needs about 10x the learning rate "
                   f"of full fine-tuning, and at this rate the adapter will barely change")
    batch = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world_size
    if batch > LARGE_BATCH:
        out.append(f"the effective batch is {batch} conversations (processes x per_device_train_batch_size x "
                   f"gradient_accumulation_steps); LoRA tends to learn less per example above ~{LARGE_BATCH}: "
                   f"prefer more steps with smaller batches")
    if pc.use_dora and pc.lora_dropout > 0:
        out.append(f"peft_config.use_dora with lora_dropout {pc.lora_dropout:g}: DoRA applies each adapted "
                   f"layer's base weight a second time, to the dropped-out input (as PEFT and the paper's "
                   f"code), about half LoRA's speed; with lora_dropout: 0 DoRA costs a few percent")
    if pc.loraplus_lr_ratio is not None and pc.loraplus_lr_ratio < 1:
        out.append(f"peft_config.loraplus_lr_ratio {pc.loraplus_lr_ratio:g} < 1 makes lora_B learn slower "
                   f"than lora_A; LoRA+ uses ratios of 2 to 16")
    return out
