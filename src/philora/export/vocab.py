"""The tokenizer as a GGUF vocabulary, for ``philora export gguf``.

llama.cpp reads no tokenizer.json: a GGUF carries a token list with types, scores (SentencePiece)
or merges (byte-level BPE), the special ids and a few flags. Three layouts cover philora's models:

- ``tokenizer.model`` present (Phi-3, Llama 2, Mistral): the SentencePiece pieces, scores and types,
  with the tokenizer's added tokens (Phi-3's ``<|end|>`` ...) on top, as llama.cpp's converter does;
- a byte-fallback BPE tokenizer.json without it (philora's tiny model, Llama-2-style HF tokenizers):
  llama.cpp's SentencePiece tokenizer, with each merged token scored minus its merge rank, so that
  llama.cpp's "best score first" merging follows the BPE merge order (llama.cpp's own converter
  scores every token -1000 there, which merges left to right and tokenizes differently);
- byte-level BPE (Phi-4, Phi-4-mini, Qwen, Llama 3): tokens, merges, and llama.cpp's name for the
  pre-tokenizer regex read from tokenizer.json.

Flags are read from the tokenizer's behaviour, not assumed: whether it adds BOS / EOS, whether text
after a special token starts with "▁" (llama.cpp's ``add_space_prefix``); the end-of-turn token is
the one training labels after each assistant reply (Phi-3: ``<|end|>``).
Hand-written because llama.cpp's converter is a script, not a library, and misses those flags.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..core.errors import PhiloraError
from ..model.families import end_of_turn_ids
from ..model.loading import load_tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType

# tokenizer.json pre-tokenizer regexes -> llama.cpp's pre-tokenizer names (llama-vocab.cpp)
_CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    _CL100K: "llama-bpe",  # Llama 3; "dbrx" when merges are not ignored (Phi-4)
    _CL100K.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",
    (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
     r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
     r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"): "gpt-4o",  # Phi-4-mini
}


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: List[str]
    types: List[int]
    scores: Optional[List[float]] = None
    merges: Optional[List[str]] = None
    special: Dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot -> id
    flags: Dict[str, bool] = field(default_factory=dict)  # add_bos, add_eos, add_space_prefix
    chat_template: object = None


def _padded(n_vocab: int, score: float):
    return [f"[PAD{i}]" for i in range(n_vocab)], [UNUSED] * n_vocab, [score] * n_vocab


def _sentencepiece(path: Path, tok, n_vocab: int) -> Optional[Vocab]:
    """Pieces, scores and types of tokenizer.model; None if it is not the tokenizer's own vocabulary
    (a stale file would silently change every token)."""
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n = sp.vocab_size()
    added = set(tok.added_tokens_decoder)
    pieces = [sp.IdToPiece(i) for i in range(n)]
    if n > n_vocab or any(p != h for i, (p, h) in enumerate(zip(pieces, tok.convert_ids_to_tokens(list(range(n)))))
                          if i not in added):
        return None
    tokens, types, scores = _padded(n_vocab, -10000.0)
    for i, piece in enumerate(pieces):
        tokens[i], scores[i] = piece, sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    return Vocab("llama", "default", tokens, types, scores)


def _merge_pairs(tokenizer_json: dict) -> List[tuple]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            for m in tokenizer_json["model"].get("merges", [])]


def _byte_fallback_bpe(tokenizer_json: dict, tok, n_vocab: int) -> Vocab:
    """A Llama-2-style BPE (byte fallback, "▁" for spaces) as a SentencePiece vocabulary whose scores
    replay the merge order: a token made by merge k scores -k, so llama.cpp merges it k-th."""
    rank: Dict[str, float] = {}
    for k, (a, b) in enumerate(_merge_pairs(tokenizer_json)):
        rank.setdefault(a + b, -float(k))
    tokens, types, scores = _padded(n_vocab, -10000.0)
    for text, i in tok.get_vocab().items():
        tokens[i], scores[i] = text, rank.get(text, -1000.0)
        types[i] = BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else NORMAL
    return Vocab("llama", "default", tokens, types, scores)


def _pre_tokenizer_name(tokenizer_json: dict, where: Path) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and "pattern" in p]
    if not regexes and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    name = PRE_TOKENIZERS.get(regexes[0]) if len(regexes) == 1 else None
    if name is None:
        raise PhiloraError(f"{where}: byte-level BPE with a pre-tokenizer llama.cpp has no name for "
                           f"({(regexes or ['none'])[0][:60]}...)")
    if name == "llama-bpe" and not tokenizer_json["model"].get("ignore_merges", False):
        return "dbrx"  # the same regex; llama-bpe would also skip merges for whole words in the vocab
    return name


def _byte_level_bpe(tokenizer_json: dict, tok, n_vocab: int, where: Path) -> Vocab:
    tokens, types, _ = _padded(n_vocab, 0.0)
    for text, i in tok.get_vocab().items():
        tokens[i], types[i] = text, NORMAL
    merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
              for pair in _merge_pairs(tokenizer_json)]  # as gguf.SpecialVocab writes them
    return Vocab("gpt2", _pre_tokenizer_name(tokenizer_json, where), tokens, types, merges=merges)


def _looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def _ids(tok, text: str) -> List[int]:
    return list(tok(text, add_special_tokens=True)["input_ids"])


def _flags(tok, vocab: Vocab) -> Dict[str, bool]:
    ids = _ids(tok, "a")
    flags = {"add_bos": tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id],
             "add_eos": tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]}
    if vocab.model == "llama":
        # llama.cpp puts "▁" before the first text and the text after each special token (or before
        # none); chat prompts start with a special token, so follow what the tokenizer does there.
        special = next((t.content for t in tok.added_tokens_decoder.values() if t.special), None)
        if special is not None:
            after = tok(special + "Hello", add_special_tokens=False)["input_ids"][1:]
            flags["add_space_prefix"] = bool(after) and tok.convert_ids_to_tokens(after[0]).startswith("▁")
    return flags


def end_of_turn(tok) -> Optional[str]:
    """The token the chat template writes right after an assistant reply, as training labels it
    (``families.end_of_turn_ids``): the GGUF's eot and the Modelfile's stop. None if there is none."""
    ids = end_of_turn_ids(tok)
    return tok.convert_ids_to_tokens(ids[0]) if ids else None


def build_vocab(model_dir: Path, n_vocab: int, tok=None) -> Vocab:
    """The GGUF vocabulary of the tokenizer in ``model_dir``, padded to the model's ``n_vocab`` rows."""
    tok = tok if tok is not None else load_tokenizer(str(model_dir), chat=False)
    if len(tok) > n_vocab:
        raise PhiloraError(f"{model_dir}: the tokenizer has {len(tok)} tokens but the model only "
                           f"{n_vocab} embedding rows")
    tj_file = model_dir / "tokenizer.json"
    tj = json.loads(tj_file.read_text(encoding="utf-8")) if tj_file.is_file() else None
    sp_file = model_dir / "tokenizer.model"
    vocab = _sentencepiece(sp_file, tok, n_vocab) if sp_file.is_file() else None
    if vocab is None:
        model = (tj or {}).get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            vocab = _byte_fallback_bpe(tj, tok, n_vocab)
        elif model.get("type") == "BPE":
            vocab = _byte_level_bpe(tj, tok, n_vocab, tj_file)
        else:
            raise PhiloraError(f"{model_dir}: unsupported tokenizer (need tokenizer.model, or a BPE "
                               f"tokenizer.json; found {model.get('type') or 'neither'})")
    for i, added in tok.added_tokens_decoder.items():  # Phi-3's <|end|> ..., as llama.cpp's converter
        if i < n_vocab:
            special = added.special or (vocab.model == "gpt2" and _looks_special(added.content))
            vocab.tokens[i] = added.content if special else added.content.replace("▁", " ")
            vocab.types[i] = CONTROL if special else USER_DEFINED
            if vocab.scores is not None:
                vocab.scores[i] = -1000.0
    for name in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{name}_token_id", None)
        if i is not None and i < n_vocab:
            vocab.special[name] = int(i)
    eot = end_of_turn(tok)
    if eot is not None:
        vocab.special["eot"] = tok.convert_tokens_to_ids(eot)
    vocab.flags = _flags(tok, vocab)
    vocab.chat_template = tok.chat_template
    return vocab


def add_vocab(writer, vocab: Vocab) -> None:
    """Write ``vocab`` into a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for name, i in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(i)
    writer.add_add_bos_token(vocab.flags["add_bos"])
    writer.add_add_eos_token(vocab.flags["add_eos"])
    if "add_space_prefix" in vocab.flags:
        writer.add_add_space_prefix(vocab.flags["add_space_prefix"])
    if vocab.chat_template:
        template = vocab.chat_template
        if isinstance(template, dict):  # several named templates
            template = [{"name": k, "template": v} for k, v in template.items()]
        writer.add_chat_template(template)
