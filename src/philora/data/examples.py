"""Tokenized examples read from Arrow without copies, and the weighted draw of each epoch.

    Examples(parts, messages)          a read-only sequence: examples[i] -> {"input_ids", "labels"}
                                       (+ "messages"), lists of ints; a slice is a view
    epoch_size(examples)               examples per epoch (each source: round(weight x its size))
    epoch_indices(examples, seed, epoch, shuffle) -> indices into ``examples``, in training order
    per_source(examples, seed, epoch)  -> per source: examples and label tokens in that epoch

A row is stored as its token ids (``input_ids``: uint16 when the vocabulary fits, else int32) and
``label_mask`` (uint8, 1 where the token is trained): labels are the ids there and -100
elsewhere, as data.encode_chat makes them. So a token costs 3 or 5 bytes, on disk and at most
that resident (the pages are the memory-mapped cache file's), where Python lists cost ~50.
Rows are sliced out of the Arrow buffers as numpy views: no per-row objects are kept, and a
row costs a few microseconds (datasets' ``ds[i]`` formats every row through Python objects).

Mixing (hand-written: ``datasets.interleave_datasets`` samples by probability and cannot say
"each example exactly this often per epoch" nor resume from a sample count): each source of
weight w and n examples puts every example floor(w) times into each epoch, plus a seeded sample
without replacement of the rest of round(w * n) (a different sample each epoch); the epoch is
then shuffled. So every epoch has the same size, each example is seen w times on average, and
the order is a pure function of (seed, epoch): a resume needs only the count of samples seen,
and another world size reads the same order. Sources of weight 1 give exactly
``batching.epoch_order``, as plain lists do.
"""

import bisect
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Dict, List, Union

import numpy as np
import pyarrow as pa
import torch

from .batching import epoch_order
from .encoding import IGNORE_INDEX


def view(array: pa.Array) -> np.ndarray:
    """A primitive Arrow array without nulls as a numpy view of its buffer (no copy; pyarrow's
    own ``to_numpy`` imports pandas, seconds of start-up a cached run need not pay)."""
    if array.null_count:
        raise ValueError("view: the array has nulls")
    dtype = np.dtype(str(array.type))
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A primitive column of ``table`` as one numpy array (its chunks' views, concatenated)."""
    chunks = [view(c) for c in table.column(name).chunks]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.dtype(str(table.schema.field(name).type)))


@dataclass(frozen=True, eq=False)
class Part:
    """Rows ``rows`` (indices into ``table``, in this order) of one source, with its weight."""
    table: pa.Table
    rows: np.ndarray
    weight: float = 1.0
    name: str = ""


class _Columns:
    """numpy views of one table's chunks (per chunk: ids, mask, offsets), and per-row counts."""

    def __init__(self, table: pa.Table):
        ids, mask = table.column("input_ids"), table.column("label_mask")
        self.ids, self.mask, self.offsets, self.starts = [], [], [], []
        start = 0
        for a, m in zip(ids.chunks, mask.chunks):
            self.ids.append(view(a.values))
            self.mask.append(view(m.values))
            self.offsets.append(view(a.offsets))
            self.starts.append(start)
            start += len(a)
        self.messages = table.column("messages").chunks if "messages" in table.column_names else None
        self.lengths = np.concatenate([np.diff(o) for o in self.offsets]) if self.offsets else np.zeros(0, np.int64)
        self.num_labels = column(table, "num_labels")


class Examples(Sequence):
    """Examples of one or more sources (``Part``s), in order; ``messages=True`` adds each
    example's conversation (eval sets: the report builds its prompts from it)."""

    def __init__(self, parts: List[Part], messages: bool = False, _columns: Dict[int, _Columns] = None):
        self.parts, self.messages = list(parts), messages
        self._columns = dict(_columns or {})
        for p in self.parts:
            if id(p.table) not in self._columns:
                self._columns[id(p.table)] = _Columns(p.table)
        self.bounds = [0]
        for p in self.parts:
            self.bounds.append(self.bounds[-1] + len(p.rows))

    def __len__(self) -> int:
        return self.bounds[-1]

    def __getitem__(self, i: Union[int, slice]):
        if isinstance(i, slice):
            return self.take(np.arange(len(self), dtype=np.int64)[i])
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        k = bisect.bisect_right(self.bounds, i) - 1
        part = self.parts[k]
        return self._row(part, int(part.rows[i - self.bounds[k]]))

    def _row(self, part: Part, r: int) -> dict:
        cols = self._columns[id(part.table)]
        c = bisect.bisect_right(cols.starts, r) - 1
        j = r - cols.starts[c]
        a, b = cols.offsets[c][j], cols.offsets[c][j + 1]
        ids = cols.ids[c][a:b].astype(np.int64)
        ex = {"input_ids": ids.tolist(), "labels": np.where(cols.mask[c][a:b] != 0, ids, IGNORE_INDEX).tolist()}
        if self.messages:
            ex["messages"] = json.loads(cols.messages[c][j].as_py())
        return ex

    def take(self, positions: np.ndarray) -> "Examples":
        """The examples at ``positions``, in that order, as a view."""
        positions = np.asarray(positions, dtype=np.int64)
        which = np.searchsorted(np.asarray(self.bounds), positions, side="right") - 1
        parts = []
        cuts = np.flatnonzero(np.diff(which)) + 1  # runs of positions in the same part
        for run in np.split(np.arange(len(positions)), cuts) if len(positions) else []:
            part = self.parts[which[run[0]]]
            rows = part.rows[positions[run] - self.bounds[which[run[0]]]]
            parts.append(Part(part.table, rows, part.weight, part.name))
        return Examples(parts, self.messages, self._columns)

    def part_counts(self) -> List[dict]:
        """Per part: {"examples", "tokens", "label_tokens"} (each example once)."""
        out = []
        for p in self.parts:
            cols = self._columns[id(p.table)]
            out.append({"examples": len(p.rows), "tokens": int(cols.lengths[p.rows].sum()),
                        "label_tokens": int(cols.num_labels[p.rows].sum())})
        return out

    def counts(self) -> dict:
        """{"examples", "tokens", "label_tokens"} of these examples (each once)."""
        parts = self.part_counts()
        return {k: sum(c[k] for c in parts) for k in ("examples", "tokens", "label_tokens")}

    def lengths(self) -> np.ndarray:
        """Token count of each example."""
        return np.concatenate([self._columns[id(p.table)].lengths[p.rows] for p in self.parts] or [np.zeros(0, int)])


def _target(weight: float, n: int) -> int:
    return int(math.floor(weight * n + 0.5))  # examples per epoch: weight x n, rounded half up


def epoch_size(examples) -> int:
    """Examples per epoch: a plain sequence's length, or the weighted sum over an Examples' sources."""
    if isinstance(examples, Examples):
        return sum(_target(p.weight, len(p.rows)) for p in examples.parts)
    return len(examples)


def _draw_seed(seed: int, epoch: int, part: int) -> int:
    digest = hashlib.blake2b(f"philora/mix/{seed}/{epoch}/{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _draws(examples: "Examples", seed: int, epoch: int) -> List[np.ndarray]:
    """Per part: the indices (into ``examples``) it contributes to ``epoch``, in source order."""
    out = []
    for k, part in enumerate(examples.parts):
        n, base = len(part.rows), examples.bounds[k]
        want = _target(part.weight, n)
        whole, extra = (want // n, want % n) if n else (0, 0)
        idx = np.arange(base, base + n, dtype=np.int64)
        picks = [idx] * whole
        if extra:
            g = torch.Generator().manual_seed(_draw_seed(seed, epoch, k))
            picks.append(idx[torch.randperm(n, generator=g)[:extra].sort().values.numpy()])
        out.append(np.concatenate(picks) if picks else np.zeros(0, np.int64))
    return out


def epoch_indices(examples, seed: int, epoch: int, shuffle: bool = True):
    """Indices into ``examples`` of epoch ``epoch`` in training order (``epoch_size`` of them)."""
    if not isinstance(examples, Examples) or all(p.weight == 1 for p in examples.parts):
        return epoch_order(len(examples), seed, epoch, shuffle)
    picks = np.concatenate(_draws(examples, seed, epoch))
    if shuffle:
        picks = picks[np.asarray(epoch_order(len(picks), seed, epoch), dtype=np.int64)]
    return picks


def per_source(examples: "Examples", seed: int, epoch: int) -> List[dict]:
    """What each source (part) puts into ``epoch``: {"name", "weight", "examples", "label_tokens"}."""
    out = []
    for k, (part, picks) in enumerate(zip(examples.parts, _draws(examples, seed, epoch))):
        rows = part.rows[picks - examples.bounds[k]]
        labels = int(examples._columns[id(part.table)].num_labels[rows].sum())
        out.append({"name": part.name, "weight": part.weight, "examples": len(picks), "label_tokens": labels})
    return out
