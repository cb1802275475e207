"""Where chat records come from, each named by file and line (or record number).

    kind_of(source)                      -> "jsonl" | "json" | "dataset"  (after resolve(source, split))
    json_lines(path)                     -> (line number, bytes) of each non-blank line, streamed
    parse_json(raw, where)               -> a record (DataError "file.jsonl:17: invalid JSON: ...")
    raw_batches(path, kind)              -> batches of {"where", "raw"} of a JSON(-lines) file, streamed
    open_dataset(source, split)          -> a datasets.Dataset (Parquet, CSV, a dataset folder, the hub)
    load_records(source, split, errors)  -> [(where, record)]  (every record in memory: small data, tests)

JSON and JSON-lines files are read here rather than with ``datasets``: errors must name the line,
and Arrow would unify the records' schemas (adding null keys and casting types), hiding exactly the
mistakes we report. JSON lines are streamed (a multi-GB file never sits whole in memory); a JSON
array file is parsed whole (use JSON lines for large data). Parquet, CSV and hub datasets go
through ``datasets.load_dataset`` (memory-mapped Arrow in its own cache).
"""

import json
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from ..core.errors import first_line
from .formats import DataError

SAMPLE_DIR = Path(__file__).resolve().parent  # made by scripts/make_sample_data.py
SAMPLE_TRAIN = SAMPLE_DIR / "sample_train.jsonl"
SAMPLE_EVAL = SAMPLE_DIR / "sample_eval.jsonl"
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class MissingSplit(DataError):
    """A dataset has no such split (build_datasets then holds out part of train)."""


def resolve(source: str, split: str = "train") -> str:
    """The file or dataset a source names: "sample" is philora's shipped data (split "train": the
    train file, any other split: its eval file); anything else as given."""
    if source == "sample":
        return str(SAMPLE_TRAIN if split == "train" else SAMPLE_EVAL)
    return source


def kind_of(source: str) -> str:
    """"jsonl" (JSON lines, streamed), "json" (one JSON array) or "dataset" (through datasets), for
    a resolved source; DataError when it is neither a supported file nor a dataset."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return "jsonl"
        if suffix == ".json":
            with open(path, "rb") as f:
                head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            return "json" if head.startswith(b"[") else "jsonl"
        if suffix in (".parquet", ".csv"):
            return "dataset"
        raise DataError(f"{source}: unsupported file type '{suffix}' (expected {', '.join(FILE_SUFFIXES)})")
    if is_dataset_name(source):
        return "dataset"
    hint = "" if path.is_absolute() else f" (a relative path is read from the working directory, {Path.cwd()})"
    raise DataError(f"{source}: no such file{hint}")


def is_dataset_name(source: str) -> bool:
    """A local dataset folder or what looks like a hub name ("owner/name") rather than a missing file."""
    path = Path(source)
    return path.is_dir() or (not path.exists() and bool(HUB_NAME.match(source))
                             and path.suffix.lower() not in FILE_SUFFIXES)


def label(source: str, split: str) -> str:
    """How logs and counts name a source: a file as given, a dataset with its split."""
    return f"{source}[{split}]" if source == "sample" or is_dataset_name(source) else source


def json_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(line number from 1, raw bytes) of each non-blank line, read as a stream. Lines end at
    "\\n" only (not str.splitlines: JSON strings may hold U+2028); a UTF-8 BOM is dropped."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                yield n, line


def parse_json(raw: bytes, where: str):
    """One JSON value from a line's bytes; DataError names ``where`` and what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None


def json_array(path: str, source: str) -> list:
    """The records of a JSON array file (parsed whole)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON array of records or JSON lines, got {type(data).__name__}")
    return data


def raw_batches(path: str, kind: str, size: int = 1000) -> Iterator[dict]:
    """Batches of {"where", "raw"} (the record's JSON bytes): a JSON-lines file streamed, or a
    JSON array file's records."""
    if kind == "json":
        rows = ((f"{path} record {i}", json.dumps(r).encode()) for i, r in enumerate(json_array(path, path), 1))
    else:
        rows = ((f"{path}:{n}", raw) for n, raw in json_lines(path))
    batch = {"where": [], "raw": []}
    for where, raw in rows:
        batch["where"].append(where)
        batch["raw"].append(raw)
        if len(batch["where"]) == size:
            yield batch
            batch = {"where": [], "raw": []}
    if batch["where"]:
        yield batch


def open_dataset(source: str, split: str):
    """A Parquet or CSV file, a dataset folder or a hub dataset's ``split`` as a datasets.Dataset."""
    import datasets
    suffix = Path(source).suffix.lower()
    if Path(source).is_file():
        try:
            return datasets.load_dataset(suffix[1:], data_files=str(source), split="train")
        except Exception as e:
            raise DataError(f"{source}: cannot read {suffix[1:]} file: {first_line(e)}") from None
    try:
        return datasets.load_dataset(source, split=split)
    except ValueError as e:
        if re.search(r"(unknown|bad) split", str(e), re.IGNORECASE):
            raise MissingSplit(f"{source}: no split '{split}'") from None
        raise DataError(f"{source}: cannot load dataset: {first_line(e)}") from None
    except Exception as e:  # unreachable hub, no such dataset, ...
        raise DataError(f"{source}: cannot load dataset: {first_line(e)}") from None


def record_name(source: str, split: str) -> str:
    """The prefix of "<prefix> record 3" for a source read through datasets."""
    return source if Path(source).is_file() else f"{source}[{split}]"


def load_records(source: str, split: str = "train", errors: Optional[list] = None) -> List[Tuple[str, dict]]:
    """(where, record) pairs of a file, a dataset (hub name or local folder) or "sample", all in
    memory. With ``errors`` (a list), invalid JSON lines are appended to it as DataErrors instead
    of raised. (Training streams instead: philora.data.)"""
    source = resolve(source, split)
    kind = kind_of(source)
    if kind == "json":
        return [(f"{source} record {i}", r) for i, r in enumerate(json_array(source, source), 1)]
    if kind == "dataset":
        name = record_name(source, split)
        return [(f"{name} record {i}", dict(r)) for i, r in enumerate(open_dataset(source, split), 1)]
    records = []
    for n, raw in json_lines(source):
        try:
            records.append((f"{source}:{n}", parse_json(raw, f"{source}:{n}")))
        except DataError as e:
            if errors is None:
                raise
            errors.append(e)
    return records
