"""batching.py: best-fit packing, the collated tensors, and packed == one by one (loss and LoRA grads)."""

import random

import pytest
import torch

from philora.model.attention import NAME, register
from philora.data.batching import best_fit_decreasing, collate, conversation_starts, epoch_order
from philora.model.loss import CausalLMLoss

register()


def test_best_fit_decreasing_fills_tightest_bin():
    lengths = [5, 3, 7, 2, 4, 1]
    bins = best_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert bins == [[2, 5], [0, 1], [4, 3]]  # 7+1, 5+3, 4+2: three bins, the minimum


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, 1, 0), epoch_order(50, 1, 1)
    assert sorted(a) == list(range(50)) and a != b and a == epoch_order(50, 1, 0)
    assert epoch_order(5, 1, 0, shuffle=False) == [0, 1, 2, 3, 4]


def test_collate_packed_tensors():
    exs = [{"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
           {"input_ids": [21, 22], "labels": [21, 22]},
           {"input_ids": [31, 32, 33, 34], "labels": [-100, -100, 33, 34]}]
    b = collate(exs, 0, True, 5)
    assert "attention_mask" not in b
    assert b["input_ids"].tolist() == [[31, 32, 33, 34, 0], [11, 12, 13, 21, 22]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # the first token of each conversation is never a target (it would be predicted across)
    assert b["labels"].tolist() == [[-100, -100, 33, 34, -100], [-100, 12, 13, -100, 22]]
    assert b["num_tokens"].item() == 9 and b["num_label_tokens"].item() == 5
    # the boundaries read back: each conversation's first token, and the padding's own segment
    assert conversation_starts(b["position_ids"]).tolist() == [[1, 0, 0, 0, 1], [1, 0, 0, 1, 0]]
    assert conversation_starts(torch.tensor([7, 8, 8, 9, 3])).tolist() == [1, 0, 1, 0, 1]  # any step


def test_collate_padded_tensors():
    exs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    b = collate(exs, 0, False, 8)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("impl", ["sdpa", NAME, "eager"])
def test_packed_batch_equals_sequences_one_by_one(impl, helpers):
    rng = random.Random(0)
    exs = []
    for n in (30, 6, 17, 25, 9, 12):
        ids = [rng.randrange(3, 128) for _ in range(n)]
        p = rng.randrange(1, n - 1)
        exs.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    model = helpers.lora_phi3(kv_heads=2, attn_implementation=impl)
    loss_fn = CausalLMLoss(model)
    packed = collate(exs, 0, True, 40)
    assert packed["input_ids"].shape[0] < len(exs)
    total, n = loss_fn(packed)
    total.backward()
    g_packed = grads(model)
    model.zero_grad()
    # per sequence: the packed loss is the sum of the one-by-one losses, and so are the gradients
    alone_total, alone_n = torch.zeros(()), 0
    for ex in exs:
        s, k = loss_fn(collate([ex], 0, False, 40))
        s.backward()
        alone_total += s.detach()
        alone_n += int(k)
    assert int(n) == alone_n
    torch.testing.assert_close(total.detach(), alone_total, rtol=1e-5, atol=1e-4)
    for k, g in grads(model).items():
        torch.testing.assert_close(g_packed[k], g, rtol=1e-4, atol=1e-5)
