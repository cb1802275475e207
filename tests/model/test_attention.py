"""philora_sdpa (attention.py) against the plain path: sequences one by one, and transformers' sdpa."""

import random

import pytest
import torch

from philora.core.config import PeftConfig
from philora.model.attention import NAME, register, segments
from philora.data.batching import collate
from philora.model.inject import inject_lora
from philora.model.loss import CausalLMLoss

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


# -- sliding window, softcap, decoding, and FlashAttention's varlen path -----------------------------

def small(kind, impl, window=8, seed=0):
    """A tiny Mistral (sliding window) or Gemma 2 (window on layer 0, softcapped scores), sharp
    attention (q, k x16), loaded with ``impl``; a fresh config each time (configs are shared state)."""
    import transformers
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, sliding_window=window, pad_token_id=0)
    if kind == "gemma2":
        kw.update(head_dim=16, query_pre_attn_scalar=16)
    config = getattr(transformers, f"{kind.capitalize()}Config")(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind.capitalize()}ForCausalLM")._from_config(config, attn_implementation=impl)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "q_proj"):
                m.q_proj.weight.mul_(16.0)
                m.k_proj.weight.mul_(16.0)
    return model.float().eval()


def test_band_is_transformers_sliding_window_mask():
    from transformers.masking_utils import sliding_window_causal_mask_function
    from philora.model.attention import band
    for window in (1, 3, 8):
        allowed = sliding_window_causal_mask_function(window)
        for q_len, kv_len in ((12, 12), (1, 12), (4, 12)):
            expect = torch.tensor([[allowed(0, 0, torch.tensor(kv_len - q_len + i), torch.tensor(j)).item()
                                    for j in range(kv_len)] for i in range(q_len)])
            assert torch.equal(band(q_len, kv_len, window, "cpu"), expect)


@pytest.mark.parametrize("kind, impl", [("mistral", NAME), ("gemma2", "philora_softcap")])
def test_packed_conversations_past_the_window_equal_eager_alone(kind, impl):
    exs = examples([30, 5, 17, 26, 8, 40])
    b = collate(exs, 0, True, 64)
    ours, ref = small(kind, impl), small(kind, "eager")
    with torch.no_grad():
        packed = ours(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        for r, row in enumerate(segments(b["position_ids"])):
            for s, e in row:
                alone = ref(input_ids=b["input_ids"][r:r + 1, s:e]).logits
                torch.testing.assert_close(packed[r:r + 1, s:e], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, impl", [("mistral", NAME), ("gemma2", "philora_softcap")])
def test_decoding_past_the_window_with_a_cache_equals_eager(kind, impl):
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[0, :5] = 0  # left padding in row 0
    mask = (ids != 0).long()
    out = {}
    for name in (impl, "eager"):
        model = small(kind, name)
        out[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():  # a cache and no mask at all: the window still holds
            first = model(input_ids=ids[1:, :15], use_cache=True)
            step = model(input_ids=ids[1:, 15:], past_key_values=first.past_key_values).logits
        out[name + "/step"] = step
    assert torch.equal(out[impl].sequences, out["eager"].sequences)
    for a, b in zip(out[impl].logits, out["eager"].logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[impl + "/step"], out["eager/step"], rtol=1e-4, atol=1e-4)


def _fa_attention(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """flash-attn's documented semantics, in torch, for one sequence: q (Lq, H, D), k/v (Lk, Hkv, D);
    causal aligned bottom-right; window (left, right) around each query's own position."""
    from philora.model.attention import scores_attention
    lq, lk = q.shape[0], k.shape[0]
    qi = torch.arange(lk - lq, lk)[:, None]
    kj = torch.arange(lk)[None, :]
    ok = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        ok &= kj <= qi
    if window_size[0] >= 0:
        ok &= kj >= qi - window_size[0]
    if window_size[1] >= 0:
        ok &= kj <= qi + window_size[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = scores_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], ok,
                           scale, softcap or None, 0.0)
    return out[0].transpose(0, 1)


def fake_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                      softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    parts = [_fa_attention(q[a:b], k[c:d], v[c:d], softmax_scale, causal, window_size, softcap)
             for a, b, c, d in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                                   cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist())]
    return torch.cat(parts, 0)


def fake_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               deterministic=False):
    return torch.stack([_fa_attention(q[i], k[i], v[i], softmax_scale, causal, window_size, softcap)
                        for i in range(q.shape[0])])


@pytest.fixture
def fake_flash_attention(monkeypatch):
    """transformers' own FlashAttention path (flash_attention_forward: cu_seqlens from position ids,
    window_size, softcap) over a torch kernel with flash-attn's semantics: what CUDA runs, on CPU."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    name = "fake_flash_attention"
    for attr, value in (("_loaded_implementation", name), ("_flash_fn", fake_flash),
                        ("_flash_varlen_fn", fake_flash_varlen), ("_flash_with_kvcache_fn", None),
                        ("_pad_fn", fa._pad_input), ("_unpad_fn", fa._unpad_input),
                        ("_process_flash_kwargs_fn", fa._lazy_define_process_function(fake_flash_varlen)),
                        ("_process_with_kvcache_kwargs_fn", dict)):
        monkeypatch.setattr(fa, attr, value)
    AttentionInterface.register(name, flash_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_flash_attention_varlen_path_is_per_conversation(kind, fake_flash_attention):
    exs = examples([30, 5, 17, 26, 8, 40], seed=2)
    b = collate(exs, 0, True, 64)
    assert b["input_ids"].shape[0] > 1  # several rows: CausalLMLoss makes them one for the varlen kernel
    flash, ref = small(kind, fake_flash_attention), small(kind, "eager")
    total, n = CausalLMLoss(flash)(b)
    expected = 0.0
    for ex in exs:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        labels[0, 0] = -100
        with torch.no_grad():
            expected += ref(input_ids=ids, labels=labels).loss.item() * int((labels[:, 1:] != -100).sum())
    assert abs(total.item() - expected) <= 1e-5 * expected
    with torch.no_grad():  # as rows, transformers' flash path would run plain causal attention across them
        rows = flash.model(input_ids=b["input_ids"], position_ids=b["position_ids"]).last_hidden_state
        one = flash.model(input_ids=b["input_ids"].reshape(1, -1),
                          position_ids=b["position_ids"].reshape(1, -1)).last_hidden_state
    assert (rows.reshape(1, -1, rows.shape[-1]) - one).abs().max() > 1e-2


def test_a_value_view_of_a_fused_projection_is_not_kept_whole():
    """Phi-3's v is a view into qkv_proj's output: backward must keep v alone, not q and k too
    (9% of the activations), and the result and gradients are those of a contiguous v."""
    from philora.model.attention import sequence_attention
    torch.manual_seed(0)
    heads, d, n = 4, 8, 11
    qkv = torch.randn(1, n, 3 * heads * d, requires_grad=True)  # (B, L, q|k|v) as qkv_proj returns it
    q, k, v = (t.view(1, n, heads, d).transpose(1, 2) for t in qkv.split(heads * d, dim=-1))
    q, k = q * 1.0, k * 1.0  # RoPE makes new tensors of q and k
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        out = sequence_attention(q, k, v, [[(0, 5), (5, n)]], None)
    assert out.shape == (1, n, heads, d)
    assert kept and max(kept) < qkv.untyped_storage().nbytes()
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, grad)
    ref_qkv = qkv.detach().clone().requires_grad_()
    rq, rk, rv = (t.view(1, n, heads, d).transpose(1, 2).contiguous() for t in ref_qkv.split(heads * d, dim=-1))
    ref = sequence_attention(rq, rk, rv, [[(0, 5), (5, n)]], None)
    (rg,) = torch.autograd.grad(ref, ref_qkv, grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-6)
