"""The built-in tiny default model: a few-million-parameter Phi-3 built offline, in seconds.

Why hand-written: no model hub is reachable where philora is developed and tested, yet every
command (train, eval, generate, benchmarks, tests) needs a real Hugging Face causal LM to run
against. So `model: tiny` resolves to a Phi-3-shaped model built locally:

- a tokenizer: a small byte-fallback BPE (Metaspace pre-tokenizer, SentencePiece/Llama-like,
  digits split one by one) trained with `tokenizers` on the shipped sample chat data plus some
  generic English, carrying Phi-3's special tokens with Phi-3's flags (all but <|endoftext|>
  strip whitespace to their right), Phi-3's chat template, bos/eos/pad and padding side;
- a model: `Phi3ForCausalLM` with random (seeded) float32 weights: hidden 256, 4 layers,
  4 heads, vocabulary rounded up to a multiple of 64 (Phi-3 pads 32011 tokens to 32064 rows).

The same seed gives byte-identical files. `resolve_model("tiny")` builds it once into a cache
directory ($PHILORA_CACHE or ~/.cache/philora) and reuses it; any other name passes through.
Unlike the real tokenizer this one never prepends "▁" to the first word, so decode(encode(text))
gives back any text exactly (special tokens' rstrip still eats the whitespace after them).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..data.build import SAMPLE_TRAIN

TINY_NAME = "tiny-phi3-v1"  # bump when the recipe below changes, so caches rebuild

# Phi-3's chat template, verbatim (see ../shared/phi3-tokenizer/chat_template.jinja)
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3's added tokens in Phi-3's id order (32000..32010 there; appended after our vocab here)
PHI3_ADDED_TOKENS = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama / Phi-3

# a little generic English so words outside the sample data still get sensible pieces
GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog.
Hello! How are you today? I am fine, thank you very much.
Please write a short story about a cat who learns to fly.
Explain why the sky is blue in simple words.
Summarize the following paragraph in one sentence.
Can you help me write an email to my manager about the project deadline?
Water boils at one hundred degrees Celsius at sea level.
The meeting has been moved to Thursday afternoon at three o'clock.
She opened the door, looked outside, and saw that it was raining again.
Machine learning models learn patterns from data and then make predictions.
Translate this sentence into French: where is the train station?
I don't know the answer, but I think we could find out together.
Here is a list of things to buy: eggs, flour, butter, sugar and milk.
Thank you for your question. Let me think about it step by step.
The children played in the park until the sun went down.
Good morning, everyone. Today we will talk about history, science and art.
It was the best of times, it was the worst of times.
Could you recommend a good book for a long journey?
Sorry, I cannot do that. Is there anything else I can help you with?
The function returns a list of numbers sorted from smallest to largest.
People often say that practice makes perfect, and they are usually right.
Remember to drink water, sleep well and take a walk every day.
Our team fixed the bug, updated the documentation and released a new version.
My favourite foods are pizza, pasta, rice, soup and fresh vegetables.
Although the weather was cold, we decided to go for a long walk by the river.
The library opens at nine in the morning and closes at six in the evening.
Computers store information as bits, which are zeros and ones.
Write a poem about the ocean, the wind and the stars at night.
What are the main differences between a virus and a bacterium?
If you have any questions, feel free to ask me again later.
"""


def _corpus():
    """Training text for the tokenizer: every message of the shipped train set, plus GENERIC_TEXT."""
    texts = []
    with open(SAMPLE_TRAIN, encoding="utf-8") as f:
        for line in f:
            texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts + GENERIC_TEXT.splitlines()


def build_tokenizer(vocab_size: int = 2000):
    """A Phi-3-like fast tokenizer: vocab_size base pieces (3 specials, 256 bytes, BPE) + 11 added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Metaspace turns spaces into "▁" (kept at the start of the next word, as SentencePiece
    # does); digits are split one by one, as in Llama. No "▁" is prepended to the first word.
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])

    # 1) learn BPE merges on the corpus
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=LLAMA_SPECIALS,
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    learned = json.loads(bpe.to_str())["model"]

    # 2) lay the vocabulary out like Llama: <unk> <s> </s>, then <0x00>..<0xFF>, then the pieces;
    #    the byte pieces let any character outside the vocabulary fall back to its UTF-8 bytes
    vocab = {tok: i for i, tok in enumerate(LLAMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])

    # 3) Phi-3's special tokens, with Phi-3's flags: all but <|endoftext|> eat whitespace after them
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA_SPECIALS])
    tok.add_special_tokens([AddedToken(t, rstrip=(t != "<|endoftext|>"), normalized=False, special=True)
                            for t in PHI3_ADDED_TOKENS])

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>",
        add_bos_token=False, add_eos_token=False, padding_side="left", model_max_length=4096,
        clean_up_tokenization_spaces=False, chat_template=PHI3_CHAT_TEMPLATE,
    )


def build_model(tokenizer, seed: int = 0):
    """A randomly initialised (seeded) float32 Phi3ForCausalLM sized for CPU experiments."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    eos = tokenizer.eos_token_id
    config = Phi3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # round up, like Phi-3's 32011 -> 32064
        hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=2048, original_max_position_embeddings=2048,
        tie_word_embeddings=False,
        # wider than Phi-3's 0.02: the embeddings and lm_head stay frozen (random) under LoRA, and
        # with 0.02 their logits can barely move away from uniform; 0.05 lets LoRA learn (eval loss
        # on the sample data falls ~65% in 200 steps, against ~40% with 0.02)
        initializer_range=0.05,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG alone
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config).to(torch.float32)
    # like Phi-3, generation stops on <|endoftext|>, <|end|> and <|assistant|>
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[eos, ids("<|end|>"), ids("<|assistant|>")],
    )
    return model


def build_tiny(path, seed: int = 0) -> None:
    """Write the tiny model (weights, config, generation config, tokenizer, template) to path."""
    from transformers.utils import logging as hf_logging

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a 17 MB file
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
    # name the generic fast-tokenizer class (loadable by transformers 4 and 5 alike; the model
    # type would otherwise pick LlamaTokenizer) and spell out Phi-3's "no BOS" setting
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("PHILORA_CACHE") or Path.home() / ".cache" / "philora")


def resolve_model(name_or_path: str) -> str:
    """name_or_path unchanged, except "tiny": the tiny model's directory (built once, cached)."""
    if name_or_path != "tiny":
        return name_or_path
    target = cache_dir() / TINY_NAME
    if (target / "config.json").is_file():
        return str(target)
    # build beside the target, then rename into place: readers never see a half-built model,
    # and if another process renamed its build first, we keep theirs and drop ours
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=target.parent))
    try:
        build_tiny(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


if __name__ == "__main__":
    import sys
    out = sys.argv[1] if len(sys.argv) > 1 else resolve_model("tiny")
    if len(sys.argv) > 1:
        build_tiny(out)
    print(out)
