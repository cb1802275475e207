"""Padding-free attention without a row mask: attention run once per packed conversation.

Why hand-written: a packed row holds several conversations, marked only by ``position_ids``
restarting at 0. transformers' ``sdpa`` then builds a (rows, 1, L, L) block-diagonal boolean
mask on every forward and runs masked attention over the whole row: work and memory quadratic
in the row length however short the conversations are, and no fused causal kernel (a mask
rules it out). On CUDA, varlen FlashAttention solves this; transformers has nothing for CPU or
for GPUs without flash-attn. Here attention runs once per conversation: exact (each
conversation attends only to its own past), ``sum(n_i^2)`` work instead of ``L^2``.

Per conversation it computes what the model's own attention computes on that conversation
alone, with the arguments transformers passes each layer:

- ``sliding_window`` (Phi-3-mini-4k, Mistral, the local layers of Gemma 2/3): a query sees
  itself and the ``window - 1`` tokens before it, as transformers' mask (``kv > q - window``).
  Conversations within the window run the fused causal kernel; longer ones a banded mask over
  that conversation only.
- ``softcap`` (Gemma 2): scores ``cap * tanh(s / cap)`` before the softmax, which SDPA cannot
  compute: those layers run the scores explicitly (matmul, cap, mask, fp32 softmax, matmul),
  in the order of transformers' eager attention.

Registered with transformers (``register()``; loading does it) under two names for the same
function: ``philora_sdpa``, and ``philora_softcap`` for models transformers refuses to run under
a name containing "sdpa" (Gemma 2). ``choose()`` picks between them from the model config. The
mask functions build a mask only when a padding mask is given (generation with left padding)
or a cache is in use; then it is transformers' own ``sdpa`` (or the explicit scores with
transformers' eager mask). Padding in philora's batches is on the right and forms its own
segment, so it never changes a real token.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core.errors import PhiloraError
from ..data.batching import conversation_starts
from .families import text_config

NAME = "philora_sdpa"
SOFTCAP_NAME = "philora_softcap"  # no "sdpa" in it: transformers checks such names for SDPA support


def segments(position_ids: torch.Tensor) -> List[List[Tuple[int, int]]]:
    """Per row, the (start, end) spans over which positions count up by one (as transformers)."""
    length = position_ids.shape[1]
    out = []
    for row in conversation_starts(position_ids).tolist():
        idx = [i for i, s in enumerate(row) if s] + [length]
        out.append(list(zip(idx[:-1], idx[1:])))
    return out


def band(q_len: int, kv_len: int, window: Optional[int], device) -> torch.Tensor:
    """(q_len, kv_len) bool: True where a query may see a key, the queries being the last q_len
    of kv_len tokens: causal, and within ``window`` tokens (itself included) when given."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    ok = k <= q
    if window is not None:
        ok &= k > q - window
    return ok


def scores_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scaling: float, softcap: Optional[float], dropout: float) -> torch.Tensor:
    """Attention with explicit scores, as transformers' eager attention of softcapped models:
    q (B, H, Lq, D), k/v (B, Hkv, Lk, D), ``mask`` bool (True: attend) or additive float,
    broadcastable to (B, H, Lq, Lk). Returns (B, H, Lq, D)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # as transformers' repeat_kv: kv head h serves query heads h*g .. h*g+g-1
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    s = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min) if mask.dtype == torch.bool else s + mask
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout > 0:
        p = F.dropout(p, p=dropout, training=True)
    return torch.matmul(p, v)


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: Optional[float],
                   window: Optional[int], softcap: Optional[float], dropout: float) -> torch.Tensor:
    """One conversation alone, causal. q (H, n, D), k/v (Hkv, n, D) -> (H, n, D)."""
    n = q.shape[1]
    windowed = window is not None and n > window
    if softcap is not None:
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        mask = band(n, n, window, q.device)
        return scores_attention(q[None], k[None], v[None], mask, scale, softcap, dropout)[0]
    gqa = k.shape[0] != q.shape[0]
    # 4-D inputs: SDPA's fused CPU kernel takes only (batch, heads, length, dim).
    mask = band(n, n, window, q.device) if windowed else None
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, dropout_p=dropout,
                                          is_causal=mask is None, scale=scaling, enable_gqa=gqa)[0]


def sequence_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       spans: List[List[Tuple[int, int]]], scaling: Optional[float],
                       dropout: float = 0.0, window: Optional[int] = None,
                       softcap: Optional[float] = None) -> torch.Tensor:
    """Causal attention within each span. q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, L, H, D).

    Rows and spans are taken with unbind/split, not slicing: their backward is one stack/cat,
    where each slice's backward would zero-fill a whole (B, H, L, D) gradient.
    """
    if value.untyped_storage().nbytes() > value.numel() * value.element_size():
        # v is a view into a fused projection's output (Phi-3's qkv_proj: q, k and v in one
        # tensor). Saved for backward as a view, it would keep all of that storage alive,
        # q and k included, though RoPE made new tensors of them: a copy of v keeps only v
        # (on the benchmark's Phi-3 shape, 9% of all saved activations freed for one copy of v).
        value = value.contiguous()
    rows = []
    for q, k, v, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), spans):
        sizes = [e - s for s, e in row]
        parts = [span_attention(qs, ks, vs, scaling, window, softcap, dropout)
                 for qs, ks, vs in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))  # (H, L, D)
    return torch.stack(rows, dim=0).transpose(1, 2).contiguous()


def philora_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, position_ids=None,
                         sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                         **kwargs):
    """transformers' attention-function signature; returns (output (B, L, H, D), None)."""
    if kwargs.get("s_aux") is not None or kwargs.get("is_causal") is False:
        raise PhiloraError(f"attention: {type(module).__name__} uses attention sinks or non-causal "
                           f"attention, which {NAME} does not compute; set model.attn_implementation: eager")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]:
        # A padding mask or a cache: the mask (built by _mask / _softcap_mask) says it all.
        if softcap is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, position_ids=position_ids, **kwargs)
        if attention_mask is None:  # no cache, no padding: one causal sequence per row
            attention_mask = band(query.shape[2], key.shape[2], sliding_window, query.device)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = scores_attention(query, key, value, attention_mask, scale, softcap, dropout)
        return out.transpose(1, 2).contiguous(), None
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    return sequence_attention(query, key, value, segments(position_ids), scaling, dropout,
                              sliding_window, softcap), None


def _mask(*args, attention_mask=None, **kwargs):
    """No mask for a whole packed batch (no padding mask, no cache); otherwise exactly what
    ``sdpa`` would build (sliding window included)."""
    if attention_mask is None and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _softcap_mask(*args, attention_mask=None, **kwargs):
    """As ``_mask``, with transformers' eager (additive float) mask where one is needed."""
    if attention_mask is None and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    from transformers.masking_utils import eager_mask
    return eager_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make ``philora_sdpa`` and ``philora_softcap`` known to transformers; returns ``NAME``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, philora_sdpa_forward)
    AttentionMaskInterface.register(NAME, _mask)
    AttentionInterface.register(SOFTCAP_NAME, philora_sdpa_forward)
    AttentionMaskInterface.register(SOFTCAP_NAME, _softcap_mask)
    return NAME


def attention_softcap(config) -> Optional[float]:
    """The attention-logit softcap of a model config (Gemma 2: 50.0), or None."""
    return getattr(text_config(config), "attn_logit_softcapping", None)


def choose(config, requested: str, training: bool) -> Tuple[str, Optional[str]]:
    """The attention implementation to load the model with, and a line to say why when philora
    chose something other than what was asked (None otherwise).

    ``sdpa`` for training (and ``philora_sdpa`` always) becomes philora's per-conversation
    attention; on a model with attention softcapping, which SDPA cannot compute, its
    ``philora_softcap`` form (explicit scores, still per conversation). ``eager`` and
    ``flash_attention_*`` are transformers' own (FlashAttention computes the window and the
    softcap itself, and packed rows reach its varlen kernel: see loss.py)."""
    if requested not in ("sdpa", NAME):
        return requested, None
    cap = attention_softcap(config)
    if cap is not None:
        register()
        kind = getattr(config, "model_type", "this model")
        return SOFTCAP_NAME, (f"attention: {kind} caps its attention scores (softcap {cap:g}), which "
                              f"SDPA cannot compute: using {SOFTCAP_NAME}, philora's per-conversation "
                              f"attention with explicit scores")
    if requested == NAME or training:
        return register(), None
    return requested, None
