"""philora export gguf, in llama.cpp itself (llama-cpp-python): it tokenizes chat prompts as
transformers does, generates the merged model's greedy tokens (logits within each type's rounding),
stops at the end of turn, runs the adapter-only export, and byte-level BPE vocabularies (Qwen,
Phi-4-mini) work. The file's contents: test_export_gguf.py; the tiny models and runs: gguf_models.py.

Skipped only when llama_cpp is not importable (``scripts/setup.sh --tests`` installs it).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from philora.export.gguf import export_gguf

# a missing llama_cpp skips this file; a broken build (OSError) fails loudly instead
pytest.importorskip("llama_cpp", reason="llama_cpp is not importable (scripts/setup.sh --tests)")


# -----------------------------------------------------------------------------
# llama.cpp itself: tokenization, greedy tokens, stop tokens, LoRA adapters

N_NEW = 24  # greedy tokens per conversation


def _llama(path: Path, lora: Path = None):
    """llama.cpp on one thread, keeping every position's logits, with a float32 KV cache (its default
    f16 cache rounds keys and values: logits then differ by ~1e-2 even from an f32 file)."""
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, n_batch=256,
                           n_threads=1, n_threads_batch=1, logits_all=True, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def _llama_greedy(llm, ids, n=N_NEW):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@torch.no_grad()
def _hf_greedy(model, ids, n=N_NEW):
    """Greedy tokens (no stop token: the raw argmax sequence) and each step's top-1 minus top-2 logit."""
    seq, margins = list(ids), []
    for _ in range(n):
        top = model(torch.tensor([seq])).logits[0, -1].topk(2)
        seq.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
    return seq[len(ids):], margins


def _prompts(tok, chats):
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def phi3_reference(phi3_merged, gguf_models):
    """The merged model in transformers: prompt texts and ids, logits on prompt + greedy tokens, and
    (greedy tokens, top-2 margins) per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(phi3_merged)
    model = AutoModelForCausalLM.from_pretrained(phi3_merged, dtype=torch.float32).eval()
    texts, ids = _prompts(tok, gguf_models.CHATS)
    greedy = [_hf_greedy(model, i) for i in ids]
    with torch.no_grad():
        logits = [model(torch.tensor([i + g])).logits[0].numpy() for i, (g, _) in zip(ids, greedy)]
    return texts, ids, logits, greedy


# largest |llama.cpp logit - transformers logit| allowed along each prompt and its greedy reply
# (measured on this model: f32 7e-6, f16 0.010, bf16 0.087, q8_0 0.21, q4_k_m 1.4)
LOGIT_TOL = {"f32": 1e-4, "f16": 0.05, "bf16": 0.25, "q8_0": 0.6, "q4_k_m": 4.0}
STOPS = (32000, 32001, 32007)  # Phi-3's: <|endoftext|>, <|assistant|>, <|end|>


def _reply(tokens):
    """The tokens a runner shows: up to and including the first stop token."""
    return tokens[:next((k + 1 for k, t in enumerate(tokens) if t in STOPS), len(tokens))]


@pytest.mark.parametrize("outtype", list(LOGIT_TOL))
def test_llama_cpp_reproduces_greedy_tokens(phi3_run, phi3_reference, tmp_path, outtype):
    """The exported run in llama.cpp: it tokenizes the chat-template text into transformers' ids, its
    logits stay within the type's rounding of the merged model's, and it generates the same replies
    (f32, f16: the same 24 raw greedy tokens, past the stop token too)."""
    texts, ids, ref_logits, ref = phi3_reference
    path = export_gguf(phi3_run, tmp_path / "m.gguf", outtype=outtype)
    llm = _llama(path)
    same = replies = 0
    for text, prompt, logits, (want, _) in zip(texts, ids, ref_logits, ref):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
        got = _llama_greedy(llm, prompt)
        same += next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        replies += _reply(got) == _reply(want)
        err = np.abs(_llama_logits(llm, prompt + want) - logits).max()
        assert err < LOGIT_TOL[outtype], err
        if outtype in ("f32", "f16"):
            assert got == want
        if outtype != "q4_k_m":
            assert _reply(got) == _reply(want)
    print(f"{outtype}: {path.stat().st_size / 2**20:.2f} MiB, replies {replies}/{len(ids)}, "
          f"greedy tokens {same}/{len(ids) * N_NEW} before the first difference")
    assert replies >= len(ids) - 1  # q4_k_m: 4-bit; on this model all three agree


def test_llama_cpp_stops_at_end_of_turn(phi3_run, tmp_path):
    """What a runner reads from the file: <|end|> is the end-of-turn token and ends generation (so do
    <|endoftext|>), Phi-3's specials are control tokens (never printed), BOS is not added."""
    import llama_cpp
    llm = _llama(export_gguf(phi3_run, tmp_path / "m.gguf", outtype="q8_0"))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_eot(vocab) == 32007 and llama_cpp.llama_vocab_eos(vocab) == 32000
    assert llama_cpp.llama_vocab_is_eog(vocab, 32007) and llama_cpp.llama_vocab_is_eog(vocab, 32000)
    assert not llama_cpp.llama_vocab_is_eog(vocab, 450)
    assert llm.detokenize([450, 32007]) == b" The" and llm.detokenize([32007], special=True) == b"<|end|>"
    assert llm.tokenize(b"Hi", add_bos=True) == llm.tokenize(b"Hi", add_bos=False)  # add_bos_token false
    assert llm.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_llama_cpp_runs_the_adapter_only_export(phi3_base, phi3_run, phi3_reference, gguf_models, tmp_path):
    """--adapter-only: the base GGUF plus the LoRA GGUF (scaling folded in, rank/alpha patterns and
    all) generate the merged model's greedy tokens; the Modelfile names the base and the adapter."""
    texts, ids, _, ref = phi3_reference
    base = export_gguf(phi3_base, tmp_path / "base" / "base.gguf", outtype="f32")
    lora = export_gguf(phi3_run, tmp_path / "lora" / "lora.gguf", outtype="f32", adapter_only=True)
    fields, tensors = gguf_models.read(lora)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert len(tensors) == 2 * 8 and tensors["blk.0.attn_qkv.weight.lora_a"][1] == [64, 8]
    modelfile = (tmp_path / "lora" / "Modelfile").read_text()
    assert f"FROM {phi3_base.resolve()}" in modelfile and "ADAPTER ./lora.gguf" in modelfile
    llm = _llama(base, lora=lora)
    for prompt, (want, _) in zip(ids, ref):
        assert _llama_greedy(llm, prompt) == want


def test_llama_cpp_tokenizes_bpe_vocabularies_like_transformers(tiny_model_dir, gguf_models, tmp_path):
    """philora's tiny model (Phi-3 with a byte-fallback BPE tokenizer, no tokenizer.model) and a tiny
    Llama with the same tokenizer: llama.cpp's ids for the sample chats equal transformers', because
    the scores replay the BPE merge order; its greedy tokens equal transformers' too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from philora.data.build import SAMPLE_EVAL
    chats = [json.loads(line)["messages"][:-1] for line in SAMPLE_EVAL.read_text().splitlines()[:20]]
    llama = gguf_models.tiny_llama(tmp_path / "llama", Path(tiny_model_dir))
    for name, model_dir in [("tiny-phi3", Path(tiny_model_dir)), ("llama", llama)]:
        llm = _llama(export_gguf(model_dir, tmp_path / name / "m.gguf", outtype="f32"))
        tok = AutoTokenizer.from_pretrained(model_dir)
        texts, ids = _prompts(tok, chats)
        for text, want in zip(texts, ids):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert _llama_greedy(llm, ids[0], 12) == _hf_greedy(model, ids[0], 12)[0]


def _byte_level_tokenizer(out: Path, regex: str, template: str, specials):
    """A byte-level BPE tokenizer (GPT-2 bytes, a Split regex as Qwen2 / Phi-4-mini) trained on the
    sample data, with ``specials`` as special added tokens (the first is eos)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from philora.data.build import SAMPLE_TRAIN
    texts = [m["content"] for line in SAMPLE_TRAIN.read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0],
                            chat_template=template).save_pretrained(out)
    return out


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PHI4_MINI = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
BYTE_LEVEL = {  # model type -> (pre-tokenizer regex, chat template, specials): Qwen2.5-like, Phi-4-mini-like
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+", CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "phi3": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+", PHI4_MINI,
             ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]),
}


@pytest.mark.parametrize("model_type", list(BYTE_LEVEL))
def test_llama_cpp_runs_byte_level_bpe_models(model_type, gguf_models, tmp_path):
    """Byte-level BPE (Phi-4-mini's and Qwen's kind): tokens, merges and the pre-tokenizer name let
    llama.cpp tokenize the sample chats as transformers does and generate its greedy tokens; the
    end-of-turn token is the template's (<|end|>, <|im_end|>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Qwen2Config
    from philora.data.build import SAMPLE_EVAL
    regex, template, specials = BYTE_LEVEL[model_type]
    tok_dir = _byte_level_tokenizer(tmp_path / "tok", regex, template, specials)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    kw = dict(vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
              tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Phi3Config(original_max_position_embeddings=512, **kw) if model_type == "phi3" else Qwen2Config(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    if model_type == "qwen2":  # nonzero q/k/v biases, which llama.cpp must add too
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "model")
    gguf_models.copy_tokenizer(tok_dir, tmp_path / "model")
    path = export_gguf(tmp_path / "model", tmp_path / "out" / "m.gguf", outtype="f32")
    fields, _ = gguf_models.read(path)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == {"qwen2": "qwen2", "phi3": "gpt-4o"}[model_type]
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids(specials[2])
    llm = _llama(path)
    chats = [json.loads(line)["messages"][:-1] for line in SAMPLE_EVAL.read_text().splitlines()[:20]]
    texts, ids = _prompts(tok, chats + [[{"role": "user", "content": "Ünïcödé 🦙 3.14159 don't\n\n  x"}]])
    for text, want in zip(texts, ids):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    assert _llama_greedy(llm, ids[0], 12) == _hf_greedy(model, ids[0], 12)[0]
