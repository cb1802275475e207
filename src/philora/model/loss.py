"""Causal-LM loss without full logits.

``causal_lm_loss`` runs the model's decoder, keeps only the positions whose next-token label
counts (assistant tokens: often a small share of a chat batch), and computes the LM head and the
cross-entropy over them in chunks. When the LM head is frozen (LoRA never trains it), a custom
autograd function computes each chunk's gradient with respect to the hidden states in the
forward pass and drops the chunk's logits at once: peak memory is one chunk of logits, and the
backward pass does no LM-head matmul at all. Chunks of ``CHUNK`` rows: on the CPU benchmark
(hidden 512, vocab 32064, ~900 label rows a step) 512-row chunks ran as fast as one 4096-row
chunk and hold 64 MiB of fp32 logits instead of 113 (256 rows: 10% slower). Hand-written because neither transformers nor
PyTorch offers this; TRL's chunked loss is generic but slow on CPU.

Returns the *sum* of token losses and the token count, so gradient accumulation can normalise
by the label tokens of the whole accumulated batch (not a mean of per-batch means).

Exact against the model's own ``*ForCausalLM`` logits: a final-logit softcap (Gemma 2:
``cap * tanh(logits / cap)``) is applied per chunk, and its gradient taken through. Under
FlashAttention a packed batch goes to the decoder as one row: transformers reaches the varlen
kernel (one sequence per conversation, sliding window and softcap per conversation) only for a
single packed row; with several rows it would run plain causal attention across conversations.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.encoding import IGNORE_INDEX
from .families import final_logit_softcap

CHUNK = 512  # LM-head rows per chunk of logits (module docstring)


class _FrozenHeadCE(torch.autograd.Function):
    """sum CE(cap(h @ W.T + b), y) for a frozen head; grad only w.r.t. h. h: (N, H), y: (N,).
    ``cap``: the final-logit softcap (None: none)."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk, softcap):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk], y[s:s + chunk]
            logits = F.linear(hc, weight, bias).float()  # (c, V): the only logits alive
            squash = None
            if softcap is not None:
                squash = torch.tanh(logits / softcap)
                logits = squash * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if grad_h is not None:
                # d/dlogits of sum CE = softmax - onehot, computed in place.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(yc), device=yc.device), yc] -= 1.0
                if squash is not None:  # through cap * tanh(z / cap): times 1 - tanh^2
                    probs.mul_(1.0 - squash.square_())
                grad_h[s:s + chunk] = (probs.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None, None


def lm_head_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                 chunk: int = CHUNK, softcap: Optional[float] = None) -> torch.Tensor:
    """Sum of cross-entropies of ``head(hidden)`` (softcapped when ``softcap`` is given) against
    ``targets``. hidden (N, H), targets (N,)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if frozen and isinstance(head, nn.Linear):
        return _FrozenHeadCE.apply(hidden, weight, bias, targets, chunk, softcap)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):  # trainable or unusual head: plain chunks
        logits = head(hidden[s:s + chunk]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        total = total + F.cross_entropy(logits, targets[s:s + chunk], reduction="sum")
    return total


def decoder_hidden(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The decoder's last hidden states and the batch they line up with. Under FlashAttention a
    padding-free batch goes as one row: the varlen kernel, one sequence per conversation (the row
    ends are position restarts too, and the first label of a row is never a target)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    if "flash" in impl and "attention_mask" not in inputs and "position_ids" in inputs:
        batch = {k: (v.reshape(1, -1) if k in ("input_ids", "labels", "position_ids", "sequence") else v)
                 for k, v in batch.items()}
        inputs = {k: batch[k] for k in inputs}
    out = model.get_decoder()(**inputs, use_cache=False)
    return (out[0] if isinstance(out, tuple) else out.last_hidden_state), batch


class CausalLMLoss(nn.Module):
    """Wraps a ``*ForCausalLM`` model; forward(batch) -> (sum of token losses, label tokens).

    A module (not a function) so DistributedDataParallel can wrap it and see every forward.
    """

    def __init__(self, model: nn.Module, chunk: int = CHUNK):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden, batch = decoder_hidden(self.model, batch)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        h = hidden[:, :-1][keep]  # (N, H): only positions whose next token is a label
        y = targets[keep]
        n = keep.sum()
        if h.shape[0] == 0:
            return hidden.sum() * 0.0, n
        head = self.model.get_output_embeddings()
        return lm_head_loss(h, head, y, self.chunk, final_logit_softcap(self.model.config)), n
