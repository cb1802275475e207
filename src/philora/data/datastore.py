"""The data cache: tokenized sources as Arrow files, memory-mapped, keyed by what changes them.

    cache_dir(configured)           -> the cache directory (data.cache_dir, else $PHILORA_CACHE/data
                                       or ~/.cache/philora/data)
    file_digest(path, root)         -> sha256 of a file's content (memoised by path and stat)
    key_of(description)             -> the key of a JSON-able description (data.py says what is in it;
                                       tokenizer_digest and versions are parts of it)
    row_schema(narrow)              -> the columns of a tokenized record (RAW_SCHEMA: before parsing)
    processes(num_proc, rows)       -> how many tokenizing processes
    find(root, key) / build(root, key, fill) -> an entry directory: found, or built by ``fill(tmp)``
    load(root, key, schema)         -> (table, meta) of a whole entry, None if absent (or damaged: removed)
    write_rows(path, schema, batches), map_rows(...), read_table(entry, files)

An entry is ``<root>/<key>/``: Arrow files (the IPC stream format datasets writes and maps) and
``meta.json``, written last. It is built in a temporary directory beside it and renamed into
place, so a reader never sees half an entry, a failed or interrupted build leaves nothing behind,
and two processes that build the same key at once (two nodes on a shared filesystem) both end
with one whole entry. Tables are read memory-mapped: the operating system pages them in and out,
and a process holds no copy.

Files are written through diskio (atomic meta.json, one-line errors for a full or read-only disk).
Several processes: ``datasets.Dataset.map(num_proc=N)`` tokenizes contiguous shards and writes
them in order, so the rows are those of one process. Content digests are memoised by (path,
size, mtime, ctime, inode): a cached run does not re-read a multi-GB file, and any write to the
file (which always changes ctime) makes it hash the file again. A memo is trusted only when the
file had been unchanged for two seconds when it was hashed, as a rewrite within the clock's
granularity can leave ctime as it was.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

import pyarrow as pa

from ..core.diskio import TEMP_PREFIX, fsync_dir, is_write_failure, write_error, write_text
from ..core.errors import PhiloraError, first_line


MIN_ROWS_PER_PROCESS = 1000  # data.num_proc=0 starts no more processes than this many rows each can use

# The stored rows: one per record (data._encode_rows fills them; examples.Examples reads them).
RAW_SCHEMA = pa.schema([("where", pa.string()), ("raw", pa.binary())])  # a JSON record before parsing


def row_schema(narrow: bool) -> pa.Schema:
    """A tokenized record: where it is, its status (data.KEPT ... data.BAD) and error, token ids
    (uint16 when the vocabulary fits, else int32), label mask, label count, length before
    truncation, a hash of the conversation, and the conversation (JSON)."""
    return pa.schema([
        ("where", pa.string()), ("status", pa.uint8()), ("error", pa.string()),
        ("input_ids", pa.list_(pa.uint16() if narrow else pa.int32())), ("label_mask", pa.list_(pa.uint8())),
        ("num_labels", pa.int32()), ("full_length", pa.int32()), ("hash", pa.int64()), ("messages", pa.string()),
    ])


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what makes the tokenizer's ids and the template's text: its vocabulary, merges,
    normalizer and added tokens (the fast tokenizer's JSON), special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__,
             backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
             json.dumps(tokenizer.chat_template, sort_keys=True, default=str),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             json.dumps({int(k): str(v) for k, v in tokenizer.added_tokens_decoder.items()}, sort_keys=True)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def versions() -> dict:
    """The libraries whose behaviour the tokenized rows depend on (templates, tokenization)."""
    import jinja2
    import tokenizers
    import transformers
    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "jinja2": jinja2.__version__}


def processes(num_proc: int, rows: int) -> int:
    """Tokenizing processes: ``data.num_proc``, or with 0 one per CPU core this process may use,
    no more than rows / MIN_ROWS_PER_PROCESS (starting a process costs more than a few rows)."""
    if num_proc > 0:
        return max(1, min(num_proc, rows))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, rows // MIN_ROWS_PER_PROCESS))


def cache_dir(configured: Optional[str] = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("PHILORA_CACHE") or Path.home() / ".cache" / "philora") / "data"


def key_of(description: dict) -> str:
    text = json.dumps(description, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def file_digest(path: str, root: Path) -> str:
    """sha256 of the file's bytes, memoised in ``root/digests`` under its real path and stat."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    memo = root / "digests" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        # Trusted only if the file had not changed for a while when it was hashed: a rewrite
        # within the file system's timestamp granularity keeps the same ctime ("racy git").
        if saved.get("path") == real and saved.get("stamp") == stamp and saved["hashed_ns"] > st.st_ctime_ns + 2e9:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    hashed_ns = time.time_ns()
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:  # best effort: a lost memo only costs another read
        write_text(memo, json.dumps({"path": real, "stamp": stamp, "sha256": digest, "hashed_ns": hashed_ns}), durable=False)
    except PhiloraError:
        pass
    return digest


def find(root: Path, key: str) -> Optional[Path]:
    entry = root / key
    return entry if (entry / "meta.json").is_file() else None


def read_meta(entry: Path) -> dict:
    return json.loads((entry / "meta.json").read_text(encoding="utf-8"))


def load(root: Path, key: str, schema: pa.Schema, warn: Callable = print) -> Optional[Tuple[pa.Table, dict]]:
    """(table, meta) of entry ``key``, or None: no such entry, or a damaged one (a file missing
    or cut short, another schema, a row count unlike meta's "rows"), which is removed and said."""
    entry = find(root, key)
    if entry is None:
        return None
    try:
        meta = read_meta(entry)
        table = read_table(entry, meta["files"], schema)
        if not table.schema.equals(schema, check_metadata=False) or table.num_rows != meta["rows"]:
            raise ValueError(f"{table.num_rows} rows of {table.schema.names}, expected {meta['rows']} of {schema.names}")
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        warn(f"data: the cached entry {entry} is damaged ({first_line(e)}); tokenizing again")
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return table, meta


def _cache_error(root: Path, e: BaseException) -> PhiloraError:
    return PhiloraError(f"{write_error(root, e)}; the tokenized data cache cannot be written there "
                        f"(data.cache_dir=DIR puts it elsewhere)")


def build(root: Path, key: str, fill: Callable[[Path], dict]) -> Path:
    """The entry ``key``: ``fill(tmp)`` writes its files into a fresh directory and returns its
    meta (JSON-able); the files are flushed to disk, meta.json written, and the directory renamed
    into place. Any failure removes the directory; a full or read-only disk is one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TEMP_PREFIX}{key}."))
    except OSError as e:
        raise _cache_error(root, e) from None
    try:
        meta = fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        write_text(tmp / "meta.json", json.dumps(meta, ensure_ascii=False))
        try:
            os.rename(tmp, root / key)
        except OSError:
            if find(root, key) is None:  # not another process's finished entry: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, PhiloraError) or not (isinstance(e, Exception) and is_write_failure(e, tmp)):
            raise
        raise _cache_error(root, e) from None
    return root / key


def _remove_stale(root: Path, age: float = 86400.0) -> None:
    """Remove what builds killed more than a day ago left (their temporary directories)."""
    now = time.time()
    for p in root.glob(f"{TEMP_PREFIX}*"):
        try:
            if now - p.stat().st_mtime > age:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def write_rows(path: Path, schema: pa.Schema, batches: Iterable[dict]) -> int:
    """Stream batches (dicts of equal-length lists) to an Arrow file; returns the row count."""
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
            rows += len(next(iter(batch.values())))
    return rows


def map_rows(dataset, fn: Callable, fn_kwargs: dict, features, num_proc: int, out: Path, key: str,
             desc: str, progress: bool = True, batch_size: int = 256) -> List[str]:
    """``fn`` over ``dataset`` (a datasets.Dataset) in batches, in ``num_proc`` processes, written
    to Arrow files named after ``out``; returns their names in row order. ``progress``: datasets'
    progress bar (on stderr)."""
    import datasets
    shown = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        mapped = dataset.map(fn, batched=True, batch_size=batch_size, with_indices=True, fn_kwargs=fn_kwargs,
                             features=features, remove_columns=dataset.column_names,
                             num_proc=num_proc if num_proc > 1 else None, cache_file_name=str(out),
                             new_fingerprint=key, load_from_cache_file=False, desc=desc)
    finally:
        if shown and not progress:
            datasets.enable_progress_bars()
    return [Path(f["filename"]).name for f in mapped.cache_files]


def read_table(entry: Path, files: List[str], schema: Optional[pa.Schema] = None) -> pa.Table:
    """The entry's files as one table, memory-mapped (no copy)."""
    tables = []
    for name in files:
        # The table's buffers point into the mapping and keep it alive; nothing is copied.
        tables.append(pa.ipc.open_stream(pa.memory_map(str(entry / name), "r")).read_all())
    if not tables:
        return schema.empty_table() if schema is not None else pa.table({})
    return pa.concat_tables(tables)
