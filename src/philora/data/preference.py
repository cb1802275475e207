"""Preference pairs (DPO, ORPO, SimPO): records, validation, encoding, packing, what ``data check`` says.

    to_pair(record, where)                  -> (prompt, chosen, rejected) message lists, validated
    encode_pair(prompt, chosen, rejected, tokenizer, max_length, truncation) -> (status, pair)
    load_pairs(source, split, cfg, tokenizer) / build_pairs(cfg, tokenizer, seed) -> pairs and counts
    collate_pairs(pairs, pad_id, packing, max_length) -> a micro-batch of 2 x pairs sequences
    PairSequences(pairs)                    -> the pairs' sequences as conversations {"input_ids", "labels"}
    pair_report(pairs, counts)              -> what ``philora data check`` reports for pairs

Records as TRL names them, decided per record from its keys:
    explicit prompt  {"prompt", "chosen", "rejected"}: each a string (one user / one assistant
                     message) or a list of messages; the prompt may be multi-turn, with a system
                     message (assistant turns in it are context, not trained)
    implicit prompt  {"chosen", "rejected"}: two whole conversations; the prompt is their longest
                     common prefix of messages (TRL's ``extract_prompt``), which must end where both
                     go on with an assistant turn
Plain text goes through the chat template as philora's SFT does (formats.py's prompt_completion),
not as raw text the way TRL treats plain strings; plain strings without a prompt are an error (a
common character prefix is no chat turn). Every mistake is one DataError line "file.jsonl:17: ...".

Encoding is encode_chat's, per side: prompt + chosen and prompt + rejected through the chat
template, labels on the completion's assistant content and its end-of-turn token. Tokens after the
last label are cut off: the model being causal, they cannot change a completion's log-probability
(TRL 1.16's DPO keeps the template's text after the end-of-turn token, ChatML's "\\n", in the
completion; that is the one difference from its tokenization). Over ``max_length`` a side keeps
its start (TRL's ``keep_start``); a pair whose prompt leaves no label is dropped, as TRL drops it;
``data.truncation: drop`` drops over-long pairs instead. Ids and label masks are kept as int32 /
uint8 numpy arrays (a few bytes a token, not Python lists).

Packing: a pair's two sequences go to the same row, each its own conversation (positions restart,
so attention never crosses them); rows are filled best-fit by pair length. ``sequence`` says which
sequence a token belongs to: 2k the chosen and 2k+1 the rejected of pair k, -1 padding.
Hand-written beside batching.collate because the loss needs that map, which collate does not give.
"""

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import jinja2
import numpy as np
import torch

from ..core.config import DataConfig
from ..core.errors import first_line
from .batching import best_fit_decreasing
from .build import KEPT, NO_LABELS, TOO_LONG, TRUNCATED
from .encoding import IGNORE_INDEX, encode_chat
from .formats import DataError, to_messages
from .records import kind_of, open_dataset, parse_json, raw_batches, record_name, resolve

SIDES = ("chosen", "rejected")
SAMPLE = "sample-preference"  # data.train: the shipped preference set (its eval split: the eval file)
SAMPLE_TRAIN = Path(__file__).resolve().parent / "preference_train.jsonl"
SAMPLE_EVAL = Path(__file__).resolve().parent / "preference_eval.jsonl"


# -----------------------------------------------------------------------------
# records -> (prompt, chosen, rejected)

def is_pair(record) -> bool:
    """Whether a record is a preference pair (it has chosen or rejected)."""
    return isinstance(record, dict) and any(record.get(k) is not None for k in SIDES)


def to_pair(record: dict, where: str = "record") -> Tuple[List[dict], List[dict], List[dict]]:
    """The validated prompt, chosen and rejected messages of one record (explicit or implicit prompt)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for side in SIDES:
        if record.get(side) is None:
            raise DataError(f"{where}: '{side}' is missing (a preference record has prompt, chosen and "
                            f"rejected; got keys {sorted(record)})")
    prompt = record.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = _implicit_prompt(record, where)
    else:
        chosen, rejected = record["chosen"], record["rejected"]
    sides = [_side(prompt, part, side, where) for part, side in ((chosen, "chosen"), (rejected, "rejected"))]
    n = len(prompt) if isinstance(prompt, list) else 1  # to_messages keeps every prompt message
    return sides[0][:n], sides[0][n:], sides[1][n:]


def _side(prompt, completion, side: str, where: str) -> List[dict]:
    """prompt + one completion, validated by formats.to_messages as a prompt-completion record
    (its messages name the key ``completion``: said here as ``chosen`` / ``rejected``)."""
    try:
        return to_messages({"prompt": prompt, "completion": completion}, "prompt_completion", where)
    except DataError as e:
        text = str(e)
        if text.startswith(where):
            text = where + text[len(where):].replace("completion", side)
        raise DataError(text) from None


def _implicit_prompt(record: dict, where: str):
    """TRL's extract_prompt: the longest common prefix of messages is the prompt."""
    chosen, rejected = record["chosen"], record["rejected"]
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise DataError(f"{where}: 'prompt' is missing: with no prompt, '{side}' must be a whole "
                            f"conversation (a list of messages), got {type(value).__name__}")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == min(len(chosen), len(rejected)):  # one is the other's prefix: its last assistant turn is the completion
        shorter = chosen if len(chosen) == k else rejected
        k = max((i for i, m in enumerate(shorter) if isinstance(m, dict) and m.get("role") == "assistant"),
                default=0)
    if k == 0:
        raise DataError(f"{where}: chosen and rejected share no prompt: their first messages differ (with no "
                        f"'prompt' key the prompt is the messages both begin with)")
    for value in (chosen, rejected):
        if not (isinstance(value[k], dict) and value[k].get("role") == "assistant"):
            raise DataError(f"{where}: the prompt differs between chosen and rejected at message {k + 1} (with "
                            f"no 'prompt' key, both must begin with the same messages and go on with the "
                            f"assistant's reply)")
    return chosen[:k], chosen[k:], rejected[k:]


# -----------------------------------------------------------------------------
# encoding

def encode_pair(prompt: List[dict], chosen: List[dict], rejected: List[dict], tokenizer, max_length: int,
                truncation: str = "truncate", where: str = "record") -> Tuple[int, Optional[dict]]:
    """(status, pair): KEPT or TRUNCATED with {"chosen", "chosen_mask", "rejected", "rejected_mask"
    (int32 ids, uint8 label masks), "prompt_length", "full_length" (longest side before cutting)};
    TOO_LONG or NO_LABELS with None."""
    pair, status, longest = {}, KEPT, 0
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        try:
            ex = encode_chat(prompt + completion, tokenizer, where=f"{where} ({side})")
        except jinja2.TemplateError as e:  # e.g. "roles must alternate user/assistant"
            raise DataError(f"{where}: the chat template rejects the {side} conversation: {first_line(e)}") from None
        mask = np.asarray([t != IGNORE_INDEX for t in ex["labels"]], dtype=np.uint8)
        if not mask.any():
            return NO_LABELS, None
        last = int(np.flatnonzero(mask)[-1]) + 1  # nothing after the last label can change the loss
        ids = np.asarray(ex["input_ids"][:last], dtype=np.int32)
        longest = max(longest, last)
        pair["prompt_length"] = min(pair.get("prompt_length", last), int(np.argmax(mask)))
        if last > max_length:
            if truncation == "drop":
                return TOO_LONG, None
            ids, mask, status = ids[:max_length], mask[:max_length], TRUNCATED
            if not mask.any():
                return NO_LABELS, None
        pair[side], pair[f"{side}_mask"] = ids, mask[:len(ids)].copy()
    pair["full_length"] = longest
    return status, pair


def iter_records(source: str, split: str = "train") -> Iterator[Tuple[str, object]]:
    """(where, record) of a source, streamed: JSON(-lines) files by line (records.py), Parquet,
    CSV and hub datasets through datasets; ``sample-preference`` is the shipped set."""
    if source == SAMPLE:
        source = str(SAMPLE_TRAIN if split == "train" else SAMPLE_EVAL)
    source = resolve(source, split)
    kind = kind_of(source)
    if kind == "dataset":
        name = record_name(source, split)
        for i, r in enumerate(open_dataset(source, split), 1):
            yield f"{name} record {i}", dict(r)
        return
    for batch in raw_batches(source, kind):
        for where, raw in zip(batch["where"], batch["raw"]):
            yield where, raw


def _record(where: str, raw):
    return parse_json(raw, where) if isinstance(raw, bytes) else raw


def load_pairs(source: str, split: str, cfg: DataConfig, tokenizer, log: Callable = print,
               messages: bool = False) -> Tuple[List[dict], dict]:
    """The encoded pairs of a source and its counts. A bad record raises its DataError, or with
    ``cfg.skip_bad_records`` is counted (the first logged). ``messages``: each pair keeps its
    prompt + chosen conversation (eval sets: generations and the report build prompts from it)."""
    pairs, errors = [], []
    counts = {"source": source, "records": 0, "pairs": 0, "skipped": 0, "truncated": 0, "dropped_too_long": 0,
              "dropped_no_labels": 0, "chosen_equals_rejected": 0}
    for where, raw in iter_records(source, split):
        counts["records"] += 1
        try:
            prompt, chosen, rejected = to_pair(_record(where, raw), where)
            status, pair = encode_pair(prompt, chosen, rejected, tokenizer, cfg.max_length, cfg.truncation, where)
        except DataError as e:
            if not cfg.skip_bad_records:
                raise
            errors.append(str(e))
            continue
        if pair is None:
            counts["dropped_too_long" if status == TOO_LONG else "dropped_no_labels"] += 1
            continue
        counts["truncated"] += int(status == TRUNCATED)
        same = bool(np.array_equal(pair["chosen"], pair["rejected"]))
        counts["chosen_equals_rejected"] += int(same)
        pair.update(where=where, same=same)
        if messages:
            pair["messages"] = prompt + chosen
        pairs.append(pair)
    counts["skipped"], counts["pairs"] = len(errors), len(pairs)
    if errors:
        log(f"data: {source}: skipped {len(errors)} bad records (first: {errors[0]})")
    counts["bad_records"] = errors
    return pairs, counts


def build_pairs(cfg: DataConfig, tokenizer, seed: int, log: Callable = print) -> Tuple[List[dict], List[dict], dict]:
    """Train pairs, eval pairs (with their messages) and counts from a DataConfig: data.eval, the
    source's own eval split (``sample-preference``), or a seeded ``eval_fraction`` held out of train."""
    train_sources = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    train, evals, stats = [], [], {"train": [], "eval": []}
    for src in train_sources:
        path = src if isinstance(src, str) else src.path
        if not isinstance(src, str) and src.weight != 1:
            raise DataError(f"{path}: source weights are not supported for preference data (weight {src.weight:g})")
        pairs, counts = load_pairs(path, cfg.train_split, cfg, tokenizer, log, messages=True)
        if not pairs:
            raise DataError(f"{path}: no preference pair to train on ({counts['records']} records)")
        stats["train"].append(counts)
        if not cfg.eval and path == SAMPLE:
            held, held_counts = load_pairs(path, cfg.eval_split, cfg, tokenizer, log, messages=True)
            evals += held
            stats["eval"].append(held_counts)
        elif not cfg.eval and cfg.eval_fraction > 0:
            order = list(range(len(pairs)))
            random.Random(seed).shuffle(order)
            n_eval = max(1, round(len(pairs) * cfg.eval_fraction))
            if n_eval >= len(pairs):
                raise DataError(f"{path}: {len(pairs)} pair(s) are too few to hold out eval_fraction="
                                f"{cfg.eval_fraction}; give data.eval or set data.eval_fraction=0")
            held = set(order[:n_eval])
            evals += [p for i, p in enumerate(pairs) if i in held]
            pairs = [p for i, p in enumerate(pairs) if i not in held]
            log(f"data: eval: held out {n_eval} of {n_eval + len(pairs)} train pairs "
                f"(eval_fraction={cfg.eval_fraction}, seed={seed})")
        train += pairs
    for src in (cfg.eval if isinstance(cfg.eval, list) else [cfg.eval] if cfg.eval else []):
        path = src if isinstance(src, str) else src.path
        pairs, counts = load_pairs(path, cfg.eval_split, cfg, tokenizer, log, messages=True)
        evals += pairs
        stats["eval"].append(counts)
    for p in train:
        p.pop("messages", None)  # only eval pairs keep their conversation
    log(f"data: train: {len(train)} preference pairs; eval: {len(evals)}")
    return train, evals, stats


# -----------------------------------------------------------------------------
# micro-batches

def sequences(pair: dict) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(ids, label mask) of a pair's chosen and rejected sequences, in that order."""
    return [(pair[s], pair[f"{s}_mask"]) for s in SIDES]


class PairSequences(Sequence):
    """Each pair's two sequences as conversations {"input_ids", "labels"}, chosen then rejected,
    made on access (no copy of the pairs): what measures a run's conversations (memory planning,
    the LongRoPE record)."""

    def __init__(self, pairs: List[dict]):
        self.pairs = pairs

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        ids, mask = sequences(self.pairs[i // 2])[i % 2]
        return {"input_ids": ids.tolist(), "labels": np.where(mask != 0, ids, IGNORE_INDEX).tolist()}

    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for p in self.pairs for x, _ in sequences(p)], dtype=np.int64)


def collate_pairs(pairs: List[dict], pad_id: int, packing: bool, max_length: int) -> Dict[str, torch.Tensor]:
    """Pairs -> tensors (rows, L): ``input_ids``, ``labels`` (completion tokens, -100 elsewhere),
    ``position_ids`` (restarting per sequence), ``sequence`` (2k chosen / 2k+1 rejected of pair k,
    -1 padding), ``attention_mask`` unpacked; ``num_tokens``, ``num_pairs``, ``num_label_tokens``;
    ``ref_logps`` (pairs, 2) when every pair carries its reference log-probs (``ref``).
    Packed: each row holds whole pairs (best fit by pair length). Unpacked: one sequence a row,
    the chosen sequences first (TRL's layout)."""
    seqs = [s for p in pairs for s in sequences(p)]
    if packing:
        lengths = [len(pairs[k]["chosen"]) + len(pairs[k]["rejected"]) for k in range(len(pairs))]
        rows = [[j for k in row for j in (2 * k, 2 * k + 1)]
                for row in best_fit_decreasing(lengths, max(max_length, max(lengths)))]
    else:
        rows = [[2 * k] for k in range(len(pairs))] + [[2 * k + 1] for k in range(len(pairs))]
    width = max(sum(len(seqs[j][0]) for j in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seq = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for j in row:
            x, m = seqs[j]
            n = len(x)
            t = torch.from_numpy(x.astype(np.int64))
            ids[r, at:at + n] = t
            lab = torch.where(torch.from_numpy(m.astype(bool)), t, IGNORE_INDEX)
            lab[0] = IGNORE_INDEX  # never predicted from the previous sequence's last token
            labels[r, at:at + n] = lab
            pos[r, at:at + n] = torch.arange(n)
            seq[r, at:at + n] = j
            at += n
        pos[r, at:] = torch.arange(width - at)  # the padding: its own (ignored) segment
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "sequence": seq}
    if not packing:
        batch["attention_mask"] = (seq >= 0).long()
    batch["num_tokens"] = torch.tensor(sum(len(x) for x, _ in seqs))
    batch["num_pairs"] = torch.tensor(len(pairs))
    batch["num_label_tokens"] = (labels[:, 1:] != IGNORE_INDEX).sum()
    if pairs and all("ref" in p for p in pairs):
        batch["ref_logps"] = torch.tensor([p["ref"] for p in pairs], dtype=torch.float64)
    return batch


# -----------------------------------------------------------------------------
# data check

def _percentiles(values) -> dict:
    v = np.asarray(values)
    if not len(v):
        return {}
    out = {"min": int(v.min())}
    out.update({f"p{q}": int(np.percentile(v, q, method="inverted_cdf")) for q in (50, 90, 95, 99)})
    out.update({"max": int(v.max()), "mean": round(float(v.mean()), 1)})
    return out


def pair_report(pairs: List[dict], counts: dict) -> dict:
    """What ``philora data check`` reports for one source's pairs (load_pairs' output): counts,
    bad records (``file:line: ...``), truncated and dropped pairs, pairs whose chosen equals
    rejected (no preference to learn; each listed by where it is, up to 20), and token lengths:
    prompt, chosen and rejected completions, and the longer side (what max_length cuts)."""
    same = [p["where"] for p in pairs if p["same"]]
    return {
        **{k: v for k, v in counts.items() if k != "bad_records"},
        "bad_records": counts.get("bad_records", [])[:50],
        "chosen_equals_rejected_at": same[:20],
        "lengths": {
            "prompt": _percentiles([p["prompt_length"] for p in pairs]),
            "chosen": _percentiles([int(p["chosen_mask"].sum()) for p in pairs]),
            "rejected": _percentiles([int(p["rejected_mask"].sum()) for p in pairs]),
            "longer_side": _percentiles([p["full_length"] for p in pairs]),
        },
        "tokens": int(sum(len(p["chosen"]) + len(p["rejected"]) for p in pairs)),
    }
