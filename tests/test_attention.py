"""philora_sdpa (attention.py) against the plain path: sequences one by one, and transformers' sdpa."""

import random

import pytest
import torch

from philora.config import PeftConfig
from philora.attention import NAME, register, segments
from philora.batching import collate
from philora.inject import inject_lora
from philora.loss import CausalLMLoss

register()


def tiny_model(impl, seed=0, kv_heads=2):
    from transformers import Phi3Config, Phi3ForCausalLM
    cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=kv_heads, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
                     original_max_position_embeddings=256, attn_implementation=impl)
    torch.manual_seed(seed)
    return Phi3ForCausalLM(cfg).float().eval()


def examples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, 128) for _ in range(n)]
        p = rng.randrange(1, n - 1)
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def test_segments_follow_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segments(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_packed_rows_equal_sequences_one_by_one(kv_heads):
    model = tiny_model(NAME, kv_heads=kv_heads)
    exs = examples([5, 17, 9, 30, 3])
    b = collate(exs, 0, True, 40)
    assert b["input_ids"].shape[0] < len(exs)  # really packed
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    for r, row in enumerate(segments(b["position_ids"])):
        for s, e in row:
            with torch.no_grad():
                alone = model(input_ids=b["input_ids"][r:r + 1, s:e], use_cache=False).logits
            torch.testing.assert_close(packed[r:r + 1, s:e], alone, rtol=1e-4, atol=1e-5)


def test_gradients_equal_transformers_block_diagonal_sdpa():
    exs = examples([7, 25, 12, 3, 18], seed=1)
    b = collate(exs, 0, True, 32)
    grads, losses = {}, {}
    for impl in ("sdpa", NAME):
        model = tiny_model(impl, seed=3)
        model.requires_grad_(False)
        torch.manual_seed(0)
        inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0))
        for n, p in model.named_parameters():  # B = 0 at init: give the LoRA path a real effect
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        loss_sum, n = CausalLMLoss(model)(b)
        loss_sum.backward()
        losses[impl] = loss_sum.detach()
        grads[impl] = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(losses[NAME], losses["sdpa"])
    for k, g in grads["sdpa"].items():
        torch.testing.assert_close(grads[NAME][k], g, rtol=1e-4, atol=1e-6)


def test_padding_mask_falls_back_to_sdpa():
    exs = examples([6, 20, 11])
    b = collate(exs, 0, False, 32)  # right padding and an attention mask
    out = {}
    for impl in ("sdpa", NAME):
        with torch.no_grad():
            out[impl] = tiny_model(impl)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(out[NAME], out["sdpa"])


def test_left_padded_generation_matches_sdpa():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    out = {}
    for impl in ("sdpa", NAME):
        out[impl] = tiny_model(impl).generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                              do_sample=False, pad_token_id=0)
    assert torch.equal(out[NAME], out["sdpa"])
