"""Padding-free attention without a mask: one causal SDPA call per packed conversation.

Why hand-written: a packed row holds several conversations, marked only by ``position_ids``
restarting at 0. transformers' ``sdpa`` then builds a (rows, 1, L, L) block-diagonal boolean
mask on every forward and runs masked attention over the whole row: work and memory quadratic
in the row length however short the conversations are, and no fused causal kernel (a mask
rules it out). On CUDA, varlen FlashAttention solves this; transformers has nothing for CPU or
for GPUs without flash-attn. This function runs ``scaled_dot_product_attention`` once per
conversation with ``is_causal=True`` and no mask: exact (each conversation attends only to its
own past), ``sum(n_i^2)`` work instead of ``L^2``, and the fused causal kernel.

Registered with transformers as ``attn_implementation="philora_sdpa"`` (``register()``; loading
does it when the config names it), with a mask function that builds a mask only when a padding
mask is given (generation with left padding): then, and for decoding with a cache, it is
plain ``sdpa``. Padding in philora's batches is on the right, so it never changes a real token.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

NAME = "philora_sdpa"


def segments(position_ids: torch.Tensor) -> List[List[Tuple[int, int]]]:
    """Per row, the (start, end) spans over which positions count up by one (as transformers)."""
    pos = position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    length = pos.shape[1]
    out = []
    for row in starts.tolist():
        idx = [i for i, s in enumerate(row) if s] + [length]
        out.append(list(zip(idx[:-1], idx[1:])))
    return out


def sequence_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       spans: List[List[Tuple[int, int]]], scaling: Optional[float],
                       dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each span. q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, L, H, D).

    Rows and spans are taken with unbind/split, not slicing: their backward is one stack/cat,
    where each slice's backward would zero-fill a whole (B, H, L, D) gradient.
    """
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for q, k, v, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), spans):
        sizes = [e - s for s, e in row]
        # 4-D inputs: SDPA's fused CPU kernel takes only (batch, heads, length, dim).
        parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout,
                                                is_causal=True, scale=scaling, enable_gqa=gqa)[0]
                 for qs, ks, vs in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))  # (H, L, D)
    return torch.stack(rows, dim=0).transpose(1, 2).contiguous()


def philora_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, position_ids=None, **kwargs):
    """transformers' attention-function signature; returns (output (B, L, H, D), None)."""
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, position_ids=position_ids, **kwargs)
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    return sequence_attention(query, key, value, segments(position_ids), scaling, dropout), None


def _mask(*args, attention_mask=None, **kwargs):
    """No mask unless a padding mask is given (then exactly what ``sdpa`` would build)."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make ``attn_implementation="philora_sdpa"`` known to transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, philora_sdpa_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
