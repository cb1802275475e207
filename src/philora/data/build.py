"""Chat data: map each record to messages, tokenize with assistant-only labels, build the train and
eval sets (tokenized once, kept in Arrow, cached, mixed by weight).

    build_datasets(cfg, tokenizer, seed)      -> train examples, eval examples (with "messages"), stats
    encode_source(source, split, cfg, tok)    -> one source's examples (with "messages") and counts
    tokenize(source, cfg, tokenizer)          -> one source's rows, tokenized (cached), and its meta

Records come from records.py (files streamed, datasets, "sample"); formats and their validation
live in formats.py; one conversation's ids and assistant-only labels come from encoding.py's
``encode_chat`` (DataError, detect_format, to_messages, load_records, encode_chat and the sample
paths are re-exported here). Tokenized rows are stored by datastore.py and read as examples.py's Examples.

Tokenized data: every record of a source becomes one Arrow row (kept, truncated, dropped or bad, with
the reason), tokenized in ``data.num_proc`` processes (datasets' map: the same rows for any number) and
cached under a key of everything that changes the rows: the input's content (a file's sha256, a hub
dataset's fingerprint) and name, the split, format, max_length, truncation, the tokenizer (vocabulary,
added tokens, chat template), the library versions and ``ENCODING_VERSION``. ``skip_bad_records`` is not in
the key: bad records are rows too, and the policy applies when the rows are read. A second run on the
same inputs maps the cache and tokenizes nothing; a changed input tokenizes again.
"""

import hashlib
import json
import os
import random
import time
from dataclasses import replace
from typing import Callable, List, Optional, Tuple, Union

import jinja2
import numpy as np
import pyarrow as pa

from ..core.config import DataConfig, DataSource
from ..core.errors import first_line
from . import datastore
from .encoding import IGNORE_INDEX
from .encoding import encode_chat  # data.encode_chat: the name _encode_rows calls (tests patch it here)
from .examples import Examples, Part, column, epoch_indices, per_source
from .formats import FORMATS, DataError, detect_format, to_messages  # noqa: F401 (re-exported)
from .records import (SAMPLE_EVAL, SAMPLE_TRAIN, MissingSplit, is_dataset_name, kind_of, label,  # noqa: F401
                      load_records, open_dataset, parse_json, raw_batches, record_name, resolve)

ENCODING_VERSION = 4  # bump whenever encode_chat's output or the stored columns change
KEPT, TRUNCATED, TOO_LONG, NO_LABELS, BAD = range(5)  # the status of a record's row
PROGRESS_ROWS = 20000  # sources this large show datasets' progress bar while tokenizing


# -----------------------------------------------------------------------------
# one source -> tokenized Arrow rows (cached)

def source_spec(source: Union[str, DataSource], cfg: DataConfig, split: str) -> DataSource:
    """A DataSource with every field set (format and split from the data config unless given)."""
    if isinstance(source, str):
        source = DataSource(path=source)
    return replace(source, format=source.format or cfg.format, split=source.split or split)


def sources(value, cfg: DataConfig, split: str) -> List[DataSource]:
    """data.train / data.eval as a list of complete DataSources."""
    return [source_spec(s, cfg, split) for s in (value if isinstance(value, list) else [value])]


def tokenize(src: DataSource, cfg: DataConfig, tokenizer, log: Callable = print,
             name: str = "train") -> Tuple[pa.Table, dict]:
    """Every record of ``src`` as a row (see _encode_rows), memory-mapped from the cache; tokenized
    now (and cached) if the cache has no entry for these inputs."""
    path = resolve(src.path, src.split)
    kind = kind_of(path)
    root = datastore.cache_dir(cfg.cache_dir)
    dataset = open_dataset(path, src.split) if kind == "dataset" else None
    if dataset is None:
        ident = {"sha256": datastore.file_digest(path, root)}
    else:  # datasets' fingerprint of what it loaded; none (an in-memory set): never reuse
        ident = {"fingerprint": getattr(dataset, "_fingerprint", None) or os.urandom(16).hex()}
    narrow = len(tokenizer) <= 1 << 16
    described = {"encoding": ENCODING_VERSION, "source": path, "split": src.split, "input": ident,
                 "format": src.format, "max_length": cfg.max_length, "truncation": cfg.truncation,
                 "tokenizer": datastore.tokenizer_digest(tokenizer), "narrow": narrow, "versions": datastore.versions()}
    key, schema, shown = datastore.key_of(described), datastore.row_schema(narrow), label(src.path, src.split)
    found = datastore.load(root, key, schema, warn=log)
    if found is not None:
        log(f"data: {name}: {shown}: tokenized data from the cache ({root / key})")
        return found
    start = time.perf_counter()
    entry = datastore.build(root, key, lambda tmp: _tokenize_into(tmp, path, kind, dataset, src, cfg, tokenizer,
                                                                  narrow, key))
    table, meta = datastore.load(root, key, schema, warn=log) or (None, None)
    if table is None:
        raise DataError(f"{shown}: the tokenized data just written to {entry} cannot be read back")
    log(f"data: {name}: tokenized {shown}: {meta['rows']} records in {time.perf_counter() - start:.1f} s "
        f"({meta['processes']} process{'es' if meta['processes'] > 1 else ''}); cached in {entry}")
    return table, meta


def _tokenize_into(tmp, path, kind, dataset, src, cfg, tokenizer, narrow, key) -> dict:
    import datasets
    if dataset is None:  # JSON: the raw records to an Arrow file first, so processes can share it
        datastore.write_rows(tmp / "records.arrow", datastore.RAW_SCHEMA, raw_batches(path, kind))
        dataset = datasets.Dataset.from_file(str(tmp / "records.arrow"))
    schema = datastore.row_schema(narrow)
    procs = datastore.processes(cfg.num_proc, len(dataset))
    if len(dataset) == 0:
        datastore.write_rows(tmp / "tokens.arrow", schema, [])
        files = ["tokens.arrow"]
    else:
        kwargs = dict(prefix=None if kind != "dataset" else record_name(path, src.split), fmt=src.format,
                      tokenizer=tokenizer, max_length=cfg.max_length, truncation=cfg.truncation, narrow=narrow)
        files = datastore.map_rows(dataset, _encode_rows, kwargs, datasets.Features.from_arrow_schema(schema),
                                   procs, tmp / "tokens.arrow", key, f"tokenizing {label(src.path, src.split)}",
                                   progress=len(dataset) >= PROGRESS_ROWS)
    (tmp / "records.arrow").unlink(missing_ok=True)
    return {"files": files, "rows": len(dataset), "processes": procs, "source": path, "split": src.split}


def _encode_rows(batch: dict, indices: List[int], prefix: Optional[str], fmt: str, tokenizer,
                 max_length: int, truncation: str, narrow: bool) -> dict:
    """One row per record (datasets.map, batched): ``status`` (KEPT, TRUNCATED, TOO_LONG, NO_LABELS,
    BAD), the one-line ``error`` of a bad record, token ids, label mask, label count, the length
    before truncation, a hash of the conversation (exact duplicates) and its messages as JSON."""
    out = {k: [] for k in datastore.row_schema(narrow).names}
    for j, index in enumerate(indices):
        where = batch["where"][j] if prefix is None else f"{prefix} record {index + 1}"
        status, error, ids, mask, full, digest, text = BAD, None, [], [], 0, 0, None
        try:
            record = parse_json(batch["raw"][j], where) if prefix is None else {k: v[j] for k, v in batch.items()}
            messages = to_messages(record, fmt, where)
            try:
                ex = encode_chat(messages, tokenizer, where=where)
            except jinja2.TemplateError as e:  # e.g. "roles must alternate user/assistant"
                raise DataError(f"{where}: the chat template rejects this conversation: {first_line(e)}") from None
        except DataError as e:
            error = str(e)
        else:
            text = json.dumps(messages, ensure_ascii=False, sort_keys=True)
            digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
            ids, labels = ex["input_ids"], ex["labels"]
            full = len(ids)
            if full > max_length:
                ids, labels = ids[:max_length], labels[:max_length]
            if full > max_length and truncation == "drop":
                status = TOO_LONG
            elif all(t == IGNORE_INDEX for t in labels):
                status = NO_LABELS
            else:
                status = TRUNCATED if full > max_length else KEPT
            if status > TRUNCATED:
                ids, labels, text = [], [], None
            mask = [int(t != IGNORE_INDEX) for t in labels]
            if narrow and ids and max(ids) >= 1 << 16:
                raise ValueError(f"{where}: token id {max(ids)} does not fit the uint16 column")
        for k, v in (("where", where), ("status", status), ("error", error), ("input_ids", ids), ("label_mask", mask),
                     ("num_labels", sum(mask)), ("full_length", full), ("hash", digest), ("messages", text)):
            out[k].append(v)
    return out


# -----------------------------------------------------------------------------
# train / eval sets

def _counts(source: str) -> dict:
    return {"source": source, "records": 0, "skipped": 0, "truncated": 0, "dropped_too_long": 0,
            "dropped_no_labels": 0}


def _summary(stats: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items() if k not in ("source", "sources"))


def encode_part(src: DataSource, cfg: DataConfig, tokenizer, log: Callable = print,
                name: str = "train") -> Tuple[pa.Table, np.ndarray, dict]:
    """A source's table, the rows of its examples (kept or truncated) and its counts. A bad record
    raises its DataError (the first in file order), unless ``cfg.skip_bad_records``: then bad
    records are counted and the first one logged."""
    table, _ = tokenize(src, cfg, tokenizer, log, name)
    status = column(table, "status")
    stats = _counts(label(src.path, src.split))
    stats["records"] = len(status)
    bad = np.flatnonzero(status == BAD)
    if len(bad):
        first = table.column("error")[int(bad[0])].as_py()
        if not cfg.skip_bad_records:
            raise DataError(first)
        log(f"data: {name}: skipped {len(bad)} bad records (first: {first})")
    stats["skipped"] = len(bad)
    for key, code in (("truncated", TRUNCATED), ("dropped_too_long", TOO_LONG), ("dropped_no_labels", NO_LABELS)):
        stats[key] = int((status == code).sum())
    if stats["truncated"] or stats["dropped_too_long"] or stats["dropped_no_labels"]:
        log(f"data: {name}: longer than max_length={cfg.max_length}: {stats['truncated']} truncated, "
            f"{stats['dropped_too_long']} dropped; {stats['dropped_no_labels']} dropped with no label left")
    return table, np.flatnonzero(status <= TRUNCATED), stats


def encode_source(source: Union[str, DataSource], split: str, cfg: DataConfig, tokenizer, log: Callable = print,
                  name: str = "eval") -> Tuple[Examples, dict]:
    """Encoded examples of one source ({"input_ids", "labels", "messages"}) and its counts; bad
    records raise a DataError naming file and line, or are skipped and counted
    (``cfg.skip_bad_records``); over-long ones are truncated or dropped per ``cfg.truncation``."""
    src = source_spec(source, cfg, split)
    table, rows, stats = encode_part(src, cfg, tokenizer, log, name)
    return Examples([Part(table, rows, src.weight, stats["source"])], messages=True), stats


def _hold_out(rows: np.ndarray, fraction: float, rng_seed, path: str) -> np.ndarray:
    """Which of ``rows`` are held out for eval: a seeded ``fraction`` (at least one, if any)."""
    n = len(rows)
    n_eval = max(1, round(n * fraction)) if fraction > 0 else 0
    if n_eval >= n:
        raise DataError(f"{path}: {n} example(s) are too few to hold out eval_fraction="
                        f"{fraction}; give data.eval or set data.eval_fraction=0")
    order = list(range(n))
    random.Random(rng_seed).shuffle(order)
    held = np.zeros(n, dtype=bool)
    held[order[:n_eval]] = True
    return held


def _own_eval(src: DataSource, cfg: DataConfig, tokenizer, log: Callable, name: str):
    """(Part, counts) of a hub dataset's (or "sample"'s) eval split, None when it has none."""
    if not (src.path == "sample" or is_dataset_name(src.path)):
        return None
    try:
        table, rows, stats = encode_part(replace(src, split=cfg.eval_split), cfg, tokenizer, log, name)
    except MissingSplit:
        return None
    return Part(table, rows, 1.0, stats["source"]), stats


def _total(per_source_stats: List[dict]) -> dict:
    total = _counts(", ".join(s["source"] for s in per_source_stats))
    for s in per_source_stats:
        for k in total:
            if k != "source":
                total[k] += s[k]
    return total


def build_datasets(cfg: DataConfig, tokenizer, seed: int, log: Callable = print) -> Tuple[Examples, Examples, dict]:
    """Train examples ({"input_ids", "labels"}), eval examples (the same plus their "messages",
    for held-out generations) and counts, from a DataConfig. The one place that decides the eval
    split: training, ``philora eval``, ``philora data check`` and the end-of-run report all use it.

    ``data.train`` as a list mixes its sources by weight (examples.epoch_indices says which
    examples each epoch reads). Without ``data.eval``, each train source gives its own eval split
    (a hub dataset, "sample") or holds out a seeded ``eval_fraction`` of its examples. A weighted
    ``data.eval`` list is drawn once (the first epoch's draw, unshuffled)."""
    mixture = isinstance(cfg.train, list)
    train_parts, eval_parts, train_stats, eval_stats = [], [], [], []
    for k, src in enumerate(sources(cfg.train, cfg, cfg.train_split)):
        tag = f" {src.path}" if mixture else ""
        table, rows, stats = encode_part(src, cfg, tokenizer, log, "train" + tag)
        if not len(rows):
            raise DataError(f"{src.path}: nothing to train on ({_summary(stats)})")
        if not cfg.eval:
            own = _own_eval(src, cfg, tokenizer, log, "eval" + tag)
            if own is None:  # hold out a seeded fraction of this source
                held = _hold_out(rows, cfg.eval_fraction, seed if k == 0 else f"{seed}/{k}", src.path)
                n_eval, n = int(held.sum()), len(rows)
                note = f"eval_fraction={cfg.eval_fraction}, seed={seed}"
                log(f"data: eval{tag}: held out {n_eval} of {n} train examples ({note})")
                own = (Part(table, rows[held], 1.0, stats["source"]),
                       _counts(f"{n_eval} held out of {src.path if mixture else 'train'} ({note})"))
                rows = rows[~held]
            eval_parts.append(own[0])
            eval_stats.append(own[1])
        train_parts.append(Part(table, rows, src.weight, stats["source"]))
        train_stats.append(stats)
    if cfg.eval:
        tagged = isinstance(cfg.eval, list)
        for src in sources(cfg.eval, cfg, cfg.eval_split):
            table, rows, stats = encode_part(src, cfg, tokenizer, log, f"eval {src.path}" if tagged else "eval")
            eval_parts.append(Part(table, rows, src.weight, stats["source"]))
            eval_stats.append(stats)
    train = Examples(train_parts)
    evals = Examples(eval_parts, messages=True)
    if any(p.weight != 1 for p in evals.parts):
        evals = evals.take(epoch_indices(evals, seed, 0, shuffle=False))
    stats = {"train": {**_total(train_stats), **train.counts()}, "eval": {**_total(eval_stats), **evals.counts()}}
    for name in ("train", "eval"):
        st = stats[name]
        log(f"data: {name}: {st['examples']} examples, {st['tokens']} tokens ({st['label_tokens']} trained on)")
    stats["train"]["sources"] = _per_source(train, train_stats, seed, log if mixture else None)
    return train, (evals if len(evals) else []), stats


def _per_source(train: Examples, per_stats: List[dict], seed: int, log: Optional[Callable]) -> List[dict]:
    """Each train source's counts, with what it puts into an epoch (the first epoch's draw; a
    fractional weight draws anew each epoch); logged for a mixture."""
    out = []
    epoch = per_source(train, seed, 0)
    total_ex = sum(e["examples"] for e in epoch) or 1
    total_lab = sum(e["label_tokens"] for e in epoch) or 1
    for src, counts, st, e in zip(train.parts, train.part_counts(), per_stats, epoch):
        out.append({**st, **counts, "weight": src.weight,
                    "per_epoch": {"examples": e["examples"], "label_tokens": e["label_tokens"]}})
        if log is not None:
            log(f"data: train: {st['source']} (weight {src.weight:g}): {e['examples']} examples per epoch "
                f"({100 * e['examples'] / total_ex:.1f}%), {e['label_tokens']} label tokens "
                f"({100 * e['label_tokens'] / total_lab:.1f}%)")
    return out
