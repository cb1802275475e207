"""loss.py against the plain path: F.cross_entropy on full logits, and transformers' own loss."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from philora.data.batching import collate
from philora.model.loss import CausalLMLoss, lm_head_loss


def plain(hidden, head, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-5)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_matches_full_logits(dtype, tol, bias):
    torch.manual_seed(0)
    head = nn.Linear(32, 300, bias=bias).to(dtype).requires_grad_(False)
    targets = torch.randint(0, 300, (37,))
    h1 = torch.randn(37, 32, dtype=dtype, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    ours = lm_head_loss(h1, head, targets, chunk=8)  # several chunks and a ragged last one
    ref = plain(h2, head, targets)
    torch.testing.assert_close(ours, ref, **tol)
    (ours * 0.5).backward()  # a non-unit upstream gradient
    (ref * 0.5).backward()
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), **tol)
    assert h1.grad.dtype == dtype


def test_frozen_head_without_grad_needs_no_backward_buffer():
    torch.manual_seed(0)
    head = nn.Linear(16, 50).requires_grad_(False)
    h, y = torch.randn(9, 16), torch.randint(0, 50, (9,))
    with torch.no_grad():
        torch.testing.assert_close(lm_head_loss(h, head, y, chunk=4), plain(h, head, y))


def test_trainable_head_matches_full_logits():
    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    ref_head = nn.Linear(16, 50)
    ref_head.load_state_dict(head.state_dict())
    h, y = torch.randn(11, 16), torch.randint(0, 50, (11,))
    ours, ref = lm_head_loss(h, head, y, chunk=4), plain(h, ref_head, y)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad)


def batch(packing):
    """Three sequences (9, 20 and 14 tokens) with labels on their second half, collated."""
    rng = random.Random(0)
    exs = []
    for n in (9, 20, 14):
        ids = [rng.randrange(3, 128) for _ in range(n)]
        exs.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return collate(exs, 0, packing, 64)


def test_causal_lm_loss_matches_transformers_loss_and_gradients(helpers):
    model, b = helpers.lora_phi3(kv_heads=4), batch(packing=False)  # no grouped-query attention
    loss_sum, n = CausalLMLoss(model)(b)
    assert n == b["num_label_tokens"]
    (loss_sum / n).backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    ref.backward()
    torch.testing.assert_close(loss_sum / n, ref)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-6)


def test_no_label_tokens_gives_zero_and_backpropagates(helpers):
    model, b = helpers.lora_phi3(kv_heads=4), batch(packing=True)
    b["labels"].fill_(-100)
    loss_sum, n = CausalLMLoss(model)(b)
    assert n.item() == 0 and loss_sum.item() == 0.0
    loss_sum.backward()


@pytest.mark.parametrize("trainable", [False, True])
def test_final_logit_softcap_value_and_gradient(trainable):
    """Gemma 2's cap * tanh(logits / cap): the chunked loss and its gradient against autograd on
    the full, capped logits."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    head.weight.data.mul_(20.0)  # logits well into tanh's curve at cap 5
    head.weight.requires_grad_(trainable)
    h = torch.randn(9, 16, requires_grad=True)
    y = torch.randint(0, 50, (9,))
    ours = lm_head_loss(h, head, y, chunk=4, softcap=5.0)
    (g_ours,) = torch.autograd.grad(ours, h)
    logits = head(h)
    ref = F.cross_entropy(torch.tanh(logits / 5.0) * 5.0, y, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)
    assert (ours - F.cross_entropy(logits, y, reduction="sum")).abs() > 1.0  # the cap matters here
