"""Micro-batches: padding-free packing (best-fit decreasing) or plain right-padding.

Packing puts several conversations in one row with ``position_ids`` restarting at 0 for each,
and no 2-D attention mask. transformers reads the restarts as sequence boundaries: varlen
FlashAttention on CUDA, a block-diagonal causal mask on SDPA/eager, so attention never crosses
conversations and the result equals running them one by one (tested). Rows hold at most
``max_length`` tokens, so attention cost stays that of one conversation of ``max_length``.
Padded batches carry ``position_ids`` too (the padding restarting at 0): attention follows the
mask, and the rotary factors of a LongRoPE model (rope.py) follow each conversation's own
length, not the row's.

The sample order is a pure function of (seed, epoch), so resuming needs only the count of
samples already seen, and a different world size reads the same global order.
"""

from typing import Dict, List, Sequence

import torch

from .encoding import IGNORE_INDEX


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """The order of the n training examples in ``epoch`` (deterministic)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of indices whose lengths sum to <= capacity (each length <= capacity)."""
    bins: List[List[int]] = []
    space: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        best = -1
        for b, free in enumerate(space):
            if lengths[i] <= free and (best < 0 or free < space[best]):
                best = b
        if best < 0:
            bins.append([i])
            space.append(capacity - lengths[i])
        else:
            bins[best].append(i)
            space[best] -= lengths[i]
    return bins


def conversation_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a conversation begins in a row of ``position_ids``: the first token, and every
    token whose position is not the previous one + 1 (the restarts :func:`collate` writes, read as
    transformers reads them). The one definition of a packed row's boundaries: attention, LongRoPE
    and NEFTune (model/) find each conversation through it. The last dimension is the row."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[..., 1:] = position_ids[..., 1:] - position_ids[..., :-1] != 1
    return starts


def collate(examples: Sequence[Dict[str, List[int]]], pad_id: int, packing: bool,
            max_length: int) -> Dict[str, torch.Tensor]:
    """Examples {"input_ids", "labels"} -> tensors (rows, L).

    Packed: ``input_ids``, ``labels``, ``position_ids`` (restart per conversation), no mask.
    Padded: ``input_ids``, ``labels``, ``attention_mask`` (right padding, labels -100),
    ``position_ids`` (0.. per conversation, the padding from 0 again).
    ``num_tokens``: non-pad tokens; ``num_label_tokens``: labels that count in the loss
    (after the one-position shift of causal LM training).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    if packing:
        rows = best_fit_decreasing(lengths, max(max_length, max(lengths)))
    else:
        rows = [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(examples[i]["input_ids"])
            lab = torch.tensor(examples[i]["labels"])
            lab[0] = IGNORE_INDEX  # never predicted from the previous conversation's last token
            labels[r, at:at + n] = lab
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
        # Padding continues the positions, so it forms its own (ignored) segment.
        pos[r, at:] = torch.arange(width - at)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not packing:
        batch["attention_mask"] = mask
    batch["num_tokens"] = torch.tensor(sum(lengths))
    batch["num_label_tokens"] = (labels[:, 1:] != IGNORE_INDEX).sum()
    return batch
