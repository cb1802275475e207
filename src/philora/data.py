"""Chat data: read records, map each format to messages, tokenize with assistant-only labels.

    load_records(source, split)      -> [(where, record)]    where = "file.jsonl:17", "file.parquet record 3",
                                                                      "owner/name[train] record 3"
    to_messages(record, fmt, where)  -> [{"role", "content"}]  (validated; DataError names file and line)
    encode_chat(messages, tokenizer) -> {"input_ids", "labels"}
    build_datasets(cfg, tokenizer, seed) -> train examples, eval examples, stats

Formats and their validation live in formats.py (DataError, detect_format and to_messages are
re-exported here).

Labels: input_ids are exactly ``tokenizer.apply_chat_template(messages, tokenize=True)``. Labels are -100
except, for each assistant turn: the tokens that carry characters of its content, then every token up to and
including the end-of-turn token, the first added token after the content (``<|end|>``, ``<|im_end|>``,
``<|eot_id|>``, ``</s>``; whatever template text sits between, such as Llama 2's space before ``</s>``, is
needed to stop and is labelled too). Headers, the newline after ``<|end|>`` and the final ``<|endoftext|>``
stay -100. Contents are located in the rendered text (the conversation rendered up to the turn with the
generation prompt tells where the turn starts, so an earlier identical message is never matched) and tokens
are matched by character offsets, which survives special tokens that swallow the whitespace to their right:
Phi-3's header token also swallows the content's leading whitespace, which is then in no token and not
trained. Where offsets are unavailable or disagree with the template's ids, labels come from comparing the
token prefixes of partial renderings, as TRL does for prompt-completion data.

JSON and JSON-lines files are read here rather than with ``datasets``: errors must name the line, and Arrow
would unify the records' schemas (adding null keys and casting types), hiding exactly the mistakes we report.
Parquet, CSV and hub datasets go through ``datasets.load_dataset``.
"""

import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import jinja2

from .config import DataConfig
from .errors import first_line
from .formats import FORMATS, DataError, detect_format, to_messages  # noqa: F401 (re-exported)
from .loss import IGNORE_INDEX

SAMPLE_DIR = Path(__file__).resolve().parent / "data"  # made by scripts/make_sample_data.py
SAMPLE_TRAIN = SAMPLE_DIR / "sample_train.jsonl"
SAMPLE_EVAL = SAMPLE_DIR / "sample_eval.jsonl"
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class MissingSplit(DataError):
    """A dataset has no such split (build_datasets then holds out part of train)."""


# -----------------------------------------------------------------------------
# reading records

def load_records(source: str, split: str = "train", errors: Optional[list] = None) -> List[Tuple[str, dict]]:
    """(where, record) pairs of a file, a dataset (hub name or local folder) or "sample" (split "train": the
    shipped train file, any other split: its eval file). With ``errors`` (a list), invalid JSON lines are
    appended to it as DataErrors instead of raised."""
    if source == "sample":  # philora's shipped data set
        source = str(SAMPLE_TRAIN if split == "train" else SAMPLE_EVAL)
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _read_json(path, source, errors)
        if suffix in (".parquet", ".csv"):
            import datasets
            try:
                ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
            except Exception as e:
                raise DataError(f"{source}: cannot read {suffix[1:]} file: {first_line(e)}") from None
            return [(f"{source} record {i}", dict(r)) for i, r in enumerate(ds, 1)]
        raise DataError(f"{source}: unsupported file type '{suffix}' (expected {', '.join(FILE_SUFFIXES)})")
    if is_dataset_name(source):
        return _load_hub(source, split)
    raise DataError(f"{source}: no such file")


def is_dataset_name(source: str) -> bool:
    """A local dataset folder or what looks like a hub name ("owner/name") rather than a missing file."""
    path = Path(source)
    return path.is_dir() or (not path.exists() and bool(HUB_NAME.match(source))
                             and path.suffix.lower() not in FILE_SUFFIXES)


def _read_json(path: Path, source: str, errors: Optional[list]) -> List[Tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one JSON array of records
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        return [(f"{source} record {i}", r) for i, r in enumerate(data, 1)]
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            records.append((f"{source}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            err = DataError(f"{source}:{n}: invalid JSON: {e.msg} (column {e.colno})")
            if errors is None:
                raise err from None
            errors.append(err)
    return records


def _load_hub(name: str, split: str) -> List[Tuple[str, dict]]:
    import datasets
    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as e:
        if re.search(r"(unknown|bad) split", str(e), re.IGNORECASE):
            raise MissingSplit(f"{name}: no split '{split}'") from None
        raise DataError(f"{name}: cannot load dataset: {first_line(e)}") from None
    except Exception as e:  # unreachable hub, no such dataset, ...
        raise DataError(f"{name}: cannot load dataset: {first_line(e)}") from None
    return [(f"{name}[{split}] record {i}", dict(r)) for i, r in enumerate(ds, 1)]


# -----------------------------------------------------------------------------
# tokenization with assistant-only labels

def encode_chat(messages: List[dict], tokenizer, max_length: Optional[int] = None) -> Dict[str, List[int]]:
    """Token ids of the chat template and labels: -100 except assistant contents and their end-of-turn token."""
    # tool definitions ride on the system message (formats.py); the template decides how they render
    chat = [{k: m[k] for k in ("role", "content", "tools") if k in m} for m in messages]
    ids = _as_ids(tokenizer.apply_chat_template(chat, tokenize=True))
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    added = set(tokenizer.added_tokens_decoder)  # headers and end-of-turn markers are added tokens
    labels = _labels_from_offsets(chat, turns, ids, tokenizer, added)
    if labels is None:
        labels = _labels_from_prefixes(chat, turns, ids, tokenizer, added)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def _as_ids(out):  # apply_chat_template returns a BatchEncoding (transformers 5) or a list (4.x)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def _labels_from_offsets(chat, turns, ids, tokenizer, added):
    if not getattr(tokenizer, "is_fast", False):
        return None
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        return None
    offsets = enc["offset_mapping"]
    labels, cursor = [IGNORE_INDEX] * len(ids), 0
    for i in turns:
        span = _content_span(chat, i, text, cursor, tokenizer)
        if span is None:
            return None
        start, end = span
        cursor = end
        last = None
        for k, ((s, e), t) in enumerate(zip(offsets, ids)):
            # content tokens; an added token only when wholly inside (not a header that swallowed whitespace)
            if s < end and e > start and (t not in added or (s >= start and e <= end)):
                labels[k], last = t, k
        if last is None:
            continue
        k = last + 1  # then through the end-of-turn token: the first added token after the content
        while k < len(ids) and ids[k] not in added:
            k += 1
        if k < len(ids):
            labels[last + 1:k + 1] = ids[last + 1:k + 1]
    return labels


def _content_span(chat, i, text, cursor, tokenizer):
    """Character span of chat[i]'s content in the rendered text, searching from where the turn starts."""
    lo = cursor
    if i > 0:
        try:
            prefix = tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)
            lo = max(lo, len(os.path.commonprefix([prefix, text])))
        except Exception:  # templates that cannot render a partial conversation
            pass
    content = chat[i]["content"]
    for needle in (content, content.strip()):  # some templates strip contents
        pos = text.find(needle, lo)
        if pos >= 0:
            return pos, pos + len(needle)
    return None


def _labels_from_prefixes(chat, turns, ids, tokenizer, added):
    """Fallback: a turn's tokens are where the ids of the conversation up to it stop matching (as TRL)."""
    labels = [IGNORE_INDEX] * len(ids)
    for i in turns:
        before = [] if i == 0 else _as_ids(
            tokenizer.apply_chat_template(chat[:i], tokenize=True, add_generation_prompt=True))
        through = _as_ids(tokenizer.apply_chat_template(chat[:i + 1], tokenize=True))
        for k in range(_common_prefix(before, ids), _common_prefix(through, ids)):
            labels[k] = ids[k]
            if ids[k] in added:  # the end-of-turn token closes the turn
                break
    return labels


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -----------------------------------------------------------------------------
# train / eval sets

def build_datasets(cfg: DataConfig, tokenizer, seed: int, log: Callable = print) -> Tuple[List[dict], List[dict], dict]:
    """Encoded train examples ({"input_ids", "labels"}), eval examples (the same plus their
    "messages", for held-out generations) and counts, from a DataConfig. The one place that
    decides the eval split: training, ``philora eval`` and the end-of-run report all use it."""
    train, train_stats = encode_source(cfg.train, cfg.train_split, cfg, tokenizer, log, "train")
    if not train:
        raise DataError(f"{cfg.train}: nothing to train on ({_summary(train_stats)})")
    evals, eval_stats = None, None
    if cfg.eval:
        evals, eval_stats = encode_source(cfg.eval, cfg.eval_split, cfg, tokenizer, log, "eval")
    elif cfg.train == "sample" or is_dataset_name(cfg.train):
        try:
            evals, eval_stats = encode_source(cfg.train, cfg.eval_split, cfg, tokenizer, log, "eval")
        except MissingSplit:
            pass
    if evals is None:  # hold out a seeded fraction of train
        n = len(train)
        n_eval = max(1, round(n * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
        if n_eval >= n:
            raise DataError(f"{cfg.train}: {n} example(s) are too few to hold out eval_fraction="
                            f"{cfg.eval_fraction}; give data.eval or set data.eval_fraction=0")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        held = set(order[:n_eval])
        evals = [ex for k, ex in enumerate(train) if k in held]
        train = [ex for k, ex in enumerate(train) if k not in held]
        eval_stats = _counts(f"{n_eval} held out of train (eval_fraction={cfg.eval_fraction}, seed={seed})")
        log(f"data: eval: held out {n_eval} of {n} train examples (eval_fraction={cfg.eval_fraction}, seed={seed})")
    train_stats.update(_token_counts(train))
    eval_stats.update(_token_counts(evals))
    for name, stats in (("train", train_stats), ("eval", eval_stats)):
        log(f"data: {name}: {stats['examples']} examples, {stats['tokens']} tokens "
            f"({stats['label_tokens']} trained on)")
    train = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in train]
    return train, evals, {"train": train_stats, "eval": eval_stats}


def _counts(source: str) -> dict:
    return {"source": source, "records": 0, "skipped": 0, "truncated": 0, "dropped_too_long": 0,
            "dropped_no_labels": 0}


def _token_counts(examples: List[dict]) -> dict:
    return {"examples": len(examples), "tokens": sum(len(ex["input_ids"]) for ex in examples),
            "label_tokens": sum(sum(1 for t in ex["labels"] if t != IGNORE_INDEX) for ex in examples)}


def _summary(stats: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items() if k != "source")


def encode_source(source: str, split: str, cfg: DataConfig, tokenizer, log: Callable = print,
                  name: str = "eval") -> Tuple[List[dict], dict]:
    """Encoded examples of one source ({"input_ids", "labels", "messages"}) and its counts; bad
    records raise a DataError naming file and line, or are skipped and counted
    (``cfg.skip_bad_records``); over-long ones are truncated or dropped per ``cfg.truncation``."""
    errors = [] if cfg.skip_bad_records else None
    records = load_records(source, split, errors=errors)
    label = f"{source}[{split}]" if source == "sample" or is_dataset_name(source) else source
    stats = _counts(label)
    stats["records"] = len(records) + len(errors or [])  # invalid JSON lines are records too
    examples = []
    for where, record in records:
        try:
            messages = to_messages(record, cfg.format, where)
            try:
                ex = encode_chat(messages, tokenizer)
            except jinja2.TemplateError as e:  # e.g. "roles must alternate user/assistant"
                raise DataError(f"{where}: the chat template rejects this conversation: {first_line(e)}") from None
        except DataError as e:
            if errors is None:
                raise
            errors.append(e)
            continue
        if len(ex["input_ids"]) > cfg.max_length:
            if cfg.truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            ex = {k: v[:cfg.max_length] for k, v in ex.items()}
            if all(t == IGNORE_INDEX for t in ex["labels"]):
                stats["dropped_no_labels"] += 1
                continue
            stats["truncated"] += 1
        elif all(t == IGNORE_INDEX for t in ex["labels"]):
            stats["dropped_no_labels"] += 1
            continue
        ex["messages"] = messages
        examples.append(ex)
    stats["skipped"] = len(errors or [])
    if errors:
        log(f"data: {name}: skipped {len(errors)} bad records (first: {errors[0]})")
    if stats["truncated"] or stats["dropped_too_long"] or stats["dropped_no_labels"]:
        log(f"data: {name}: longer than max_length={cfg.max_length}: {stats['truncated']} truncated, "
            f"{stats['dropped_too_long']} dropped; {stats['dropped_no_labels']} dropped with no label left")
    return examples, stats
