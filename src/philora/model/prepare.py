"""Every change philora makes to a model transformers loaded, in order, in one place.

Hand-written because each change is philora's own (transformers and PEFT have none of them);
listed here so a reader sees what the trained model is and in which order it was made. The order
matters where noted.

Every loaded model (``loading.load_model_and_tokenizer``, training and inference alike):

1. attention (:func:`attention`): philora's per-conversation SDPA for training, its explicit-score
   form for models with softcapped attention (Gemma 2, inference too), said when it differs from
   what the config asked. Chosen before the weights load: it is ``from_pretrained``'s argument.
2. LongRoPE per conversation (``rope.install``): each packed conversation gets its own factor set.
3. training only: gated SiLU MLPs keep less for backward, same numbers (``fused.fuse_mlps``);
   no KV cache; ``model.gradient_checkpointing: true`` recomputes each decoder layer in backward.

Training (:func:`prepare`, after the model loaded):

4. LoRA layers (``inject.inject_lora``; from a saved adapter with ``peft_config.init_adapter``):
   after 3, so the fused MLP forward calls the LoRA layers.
5. NEFTune noise on the input embeddings (``training_config.neftune_noise_alpha``), hooks taken
   off when the run closes.
6. ``model.gradient_checkpointing: auto``: measured on the model as it will train (4 and 5 in
   place, through the loss object), every rank deciding alike.
7. the distributed wrapper (DDP or FSDP) around the loss object: last, it must see the final
   modules and parameters.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..core.config import Config, ModelConfig
from . import attention as attention_impl
from . import memory, rope
from .fused import fuse_mlps
from .inject import count_parameters, inject_lora
from .loss import CausalLMLoss
from .neftune import NEFTune
from .preference_ref import start_adapter


def attention(cfg: ModelConfig, path: str, training: bool, say: Callable = print) -> str:
    """Step 1: the attention implementation to load the model at ``path`` with."""
    impl, note = attention_impl.choose(model_config(path, cfg), cfg.attn_implementation, training)
    if note:
        say(note)
    return impl


def patch_loaded(model: nn.Module, cfg: ModelConfig, training: bool) -> None:
    """Steps 2-3 on a model just loaded (weights frozen)."""
    rope.install(model)
    if training:
        fuse_mlps(model)
    model.config.use_cache = not training
    if training and cfg.gradient_checkpointing is True:  # "auto": prepare() decides
        memory.enable_checkpointing(model)


@dataclass(frozen=True)
class Process:
    """What :func:`prepare` needs of the process that trains (the run's, not the config's)."""
    device: torch.device
    held: contextlib.ExitStack  # closed when the run ends: NEFTune's hooks come off then
    autocast: Callable = contextlib.nullcontext  # the mixed-precision context of a training step
    agree: Callable[[bool], bool] = bool  # agree(on): whether any rank voted on (one process: its vote)
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # the distributed wrapper (none: as is)
    log: Callable = print


def prepare(model: nn.Module, loss_fn: nn.Module, cfg: Config, examples, pad_id: int, proc: Process) -> nn.Module:
    """Steps 4-7 on a loaded model (steps 1-3 done) and the loss object over it (its forward
    takes a batch and returns (loss sum, label tokens)); returns the loss object to train with.
    ``examples`` (conversations: input_ids, labels) and ``pad_id``: what step 6 measures."""
    tc, log = cfg.training_config, proc.log
    if cfg.peft_config.init_adapter:  # 4: the LoRA starts from a saved adapter (SFT, then DPO on it)
        start_adapter(model, cfg.peft_config.init_adapter, cfg.peft_config.lora_dropout)
        log(f"LoRA starts from {cfg.peft_config.init_adapter} (peft_config.init_adapter)")
    else:
        inject_lora(model, cfg.peft_config)
    trainable, total = count_parameters(model)
    log(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    if tc.neftune_noise_alpha:  # 5: noise in training mode only; off when the run closes
        proc.held.callback(NEFTune(model, tc.neftune_noise_alpha).remove)
    loss_fn.train()
    if cfg.model.gradient_checkpointing == "auto":  # 6: on where the longest micro-batch would not fit
        # a preference micro-batch is 2 x batch conversations (``examples`` are its sequences), measured
        # through the SFT loss: the same decoder pass
        probe, per = ((loss_fn, tc.per_device_train_batch_size) if isinstance(loss_fn, CausalLMLoss)
                      else (CausalLMLoss(model), 2 * tc.per_device_train_batch_size))
        on, line = memory.plan(probe, examples, per, pad_id, proc.device, proc.autocast)
        if proc.agree(on):
            memory.enable_checkpointing(model)
        log(line)
    return proc.wrap(loss_fn)  # 7


def model_config(path: str, cfg: ModelConfig) -> Optional[object]:
    """The model's config, or None where it cannot be read (from_pretrained then says why)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code,
                                          revision=cfg.revision)
    except (OSError, ValueError):
        return None
