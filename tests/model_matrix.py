"""The model matrix (test_families*.py): tiny models of each family, from fixtures/families.json.

A pytest plugin, registered by conftest.py's ``pytest_plugins`` (test files never import it): the
session fixture ``families`` builds each family's tokenizer and sharp random model once, on demand.
"""

import shutil
import types
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"

FAMILY_SHARP = 16.0  # q and k scaled by this: attention logits x256, mean top attention weight ~0.75


def _family_tokenizer(spec, kinds, words, out):
    """A family's tokenizer, offline: Phi-3's real one (tests/fixtures), or a small BPE with the
    family's special tokens: byte-level (Llama 3, Qwen, Phi-4) or SentencePiece-like (Mistral, Gemma).
    Optional keys of a tokenizer kind (tests/export/test_verify_tools.py sets them on its copy):
    ``added_tokens`` (added, not special), ``split_regex`` (the family's pre-tokenizer split before the
    byte-level step), ``ignore_merges``, ``bpe_vocab_size`` (default 400)."""
    import string

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    if spec["tokenizer"] == "phi3":
        shutil.copytree(FIXTURES / "phi3-tokenizer", out, dirs_exist_ok=True)
        (out / "chat_template.jinja").write_text(spec["chat_template"], encoding="utf-8")
        return
    kind = kinds[spec["tokenizer"]]
    byte_level = kind["byte_level"]
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>", byte_fallback=not byte_level,
                               ignore_merges=kind.get("ignore_merges", False)))
    if byte_level:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        if kind.get("split_regex"):  # the family's own split (Llama 3, Qwen2: "\n\n" one piece before any text)
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(kind["split_regex"]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = list(string.printable.strip()) + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=kind.get("bpe_vocab_size", 400), initial_alphabet=alphabet,
                                  show_progress=False, special_tokens=[] if byte_level else ["<unk>"])
    tok.train_from_iterator([words] * 4 + ["Hello! What is 17 plus 25? Yes, no."], trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in kind["special_tokens"]])
    # added but not special, as Qwen2.5's <tool_call>: kept by decode(skip_special_tokens=True)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in kind.get("added_tokens", ())])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=kind["bos_token"], eos_token=kind["eos_token"],
                            pad_token=kind["pad_token"], chat_template=spec["chat_template"],
                            clean_up_tokenization_spaces=False).save_pretrained(out)


def sharpen(model, factor=FAMILY_SHARP):
    """Scale every attention's queries and keys by ``factor`` (q/k projections and biases, Phi-3's
    fused q and k rows, or the q/k norms of qk-normed models, whose q and k are unit-RMS), in place:
    random init gives near-uniform attention, which hides position and window bugs."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "q_norm") and hasattr(m, "k_norm"):  # Gemma 3: (1 + weight) scales q and k
                for norm in (m.q_norm, m.k_norm):
                    norm.weight.copy_((1 + norm.weight) * factor ** 0.5 - 1)
            elif hasattr(m, "qkv_proj"):
                rows = (m.config.num_attention_heads + m.num_key_value_heads) * m.head_dim
                m.qkv_proj.weight[:rows] *= factor
            elif hasattr(m, "q_proj") and hasattr(m, "k_proj"):
                for p in (m.q_proj, m.k_proj):
                    p.weight.mul_(factor)
                    if p.bias is not None:
                        p.bias.mul_(factor)


def build_family(table, name, out, sharp=FAMILY_SHARP):
    """A family's tokenizer and sharp random float32 model saved to ``out``; returns it as str. ``sharp``
    1: attention as initialised (LoRA then learns where to attend in a few dozen steps)."""
    import transformers
    from transformers import AutoTokenizer, GenerationConfig
    spec = table["families"][name]
    _family_tokenizer(spec, table["tokenizers"], table["words"], out)
    tok = AutoTokenizer.from_pretrained(out)
    kwargs = dict(spec["config"])
    kwargs.setdefault("vocab_size", -(-len(tok) // 64) * 64)
    config = getattr(transformers, spec["config_class"])(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, spec["model_class"])(config).float()
    sharpen(model, sharp)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    return str(out)


def family_conversations(words, system=True, seed=0):
    """Six conversations, 1 to 3 turns, from a few tokens to ~150: some within a 24-token sliding
    window, some past it, some on each side of a LongRoPE switch at 48."""
    import random
    rng, words = random.Random(seed), words.split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."
    convs = [
        [("user", "Hi"), ("assistant", "Hello!")],
        [("system", text(6)), ("user", text(8)), ("assistant", text(10))],
        [("user", text(3)), ("assistant", text(4)), ("user", text(5)), ("assistant", text(30))],
        [("user", text(20)), ("assistant", text(45))],
        [("system", text(4)), ("user", text(2)), ("assistant", text(70))],
        [("user", "What is 17 plus 25?"), ("assistant", "42")],
    ]
    return [[{"role": r, "content": c} for r, c in conv if system or r != "system"] for conv in convs]


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """The model matrix: ``families.spec[name]`` (fixtures/families.json), ``families.dir(name)``
    (built once per session), ``families.conversations(name)``."""
    import json
    table = json.loads((FIXTURES / "families.json").read_text(encoding="utf-8"))
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_family(table, name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return built[name]

    def conversations(name, seed=0):
        return family_conversations(table["words"], table["families"][name]["system_role"], seed)
    return types.SimpleNamespace(spec=table["families"], dir=get, conversations=conversations, sharpen=sharpen)
