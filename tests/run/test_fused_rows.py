"""train.row_capacity: where attention runs per conversation, a micro-batch packs into one row
with no padding, and the loss and gradients are those of rows of max_length (and of each
conversation alone, which test_batching checks for packed rows)."""

import torch

from philora.model import attention
from philora.data.batching import collate
from philora.model.loss import CausalLMLoss
from philora.run.train import row_capacity


def examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_capacity_by_attention(helpers):
    model = helpers.lora_phi3(attn_implementation="eager")
    assert row_capacity(model, 64) == 64  # masked attention: L^2 per row
    model.config._attn_implementation = attention.register()
    assert row_capacity(model, 64) > 10 ** 9
    model.config._attn_implementation = "flash_attention_2"
    assert row_capacity(model, 64) > 10 ** 9


def test_one_row_equals_rows_of_max_length(helpers):
    model = helpers.lora_phi3(attn_implementation=attention.register()).train()
    batch = examples([30, 25, 20, 12, 9])
    rows = collate(batch, 0, True, 40)
    one = collate(batch, 0, True, row_capacity(model, 40))
    assert rows["input_ids"].shape[0] > 1 and (rows["input_ids"] == 0).any()  # padded rows
    assert one["input_ids"].shape == (1, 96)  # all tokens, no padding
    assert one["num_tokens"] == rows["num_tokens"] and one["num_label_tokens"] == rows["num_label_tokens"]
    loss_fn = CausalLMLoss(model)
    results = []
    for b in (rows, one):
        loss, n = loss_fn(b)
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()
                                           if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2
    torch.testing.assert_close(l2, l1, **helpers.TIGHT)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], **helpers.TIGHT)
