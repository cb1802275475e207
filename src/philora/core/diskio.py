"""Writing files so that a full disk, a read-only file system or a missing permission is a
one-line error naming the file, and a failed write never leaves a half-written file where a
good one was.

Hand-written: the standard library has the pieces (``os.replace``, ``fsync``) but no "write this
file atomically" call, and the libraries that write for us report a full disk opaquely (torch:
``[enforce fail at inline_container.cc]``, safetensors: a Rust ``IoError``). So philora's own
files are serialised to bytes in memory and written here (:func:`write_bytes`), and files that a
library writes (``save_pretrained``) go to a staging directory first (:func:`staged`).
Before any of that, :func:`guard_output` decides whether an output may be written at all.
Every temporary name starts with :data:`TEMP_PREFIX`, so a run can clean up what a kill left.
"""

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from .errors import PhiloraError, first_line

TEMP_PREFIX = ".philora-tmp-"

# What to do about each common cause, after the system's own words for it.
HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exceeded: free some space",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "no permission to write there: write somewhere else",
    errno.EPERM: "no permission to write there: write somewhere else",
}


class WriteError(PhiloraError):
    """A file could not be written; the message is one line naming it and saying why."""


def _disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (almost) no space left."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free < (1 << 20)
            except OSError:
                return False
    return False


def guard_output(out, force: bool, directory: bool, inputs=(), name: str = "--out") -> Path:
    """Check an output before any work: refuse an output that is one of ``inputs``, a file where a
    directory is wanted (or a directory where a file is), and, without ``force``, an existing
    file or non-empty directory. ``name`` is how the message names it. The one output policy:
    the CLI calls it for every command, merge and GGUF export for what only they know."""
    path = Path(out)
    for p in inputs:
        if p and Path(p).exists() and path.exists() and path.resolve() == Path(p).resolve():
            raise PhiloraError(f"{name} '{out}' is an input of this command; choose another directory")
    if directory and path.exists() and not path.is_dir():
        raise PhiloraError(f"{name} '{out}' exists and is not a directory")
    if not directory and path.is_dir():
        raise PhiloraError(f"{name} '{out}' is a directory; give a file name")
    if not force and ((directory and path.is_dir() and any(path.iterdir())) or (not directory and path.exists())):
        raise PhiloraError(f"{name} '{out}' already exists{' and is not empty' if directory else ''}; "
                           f"pass --force to overwrite it")
    return path


def write_error(path, e: BaseException) -> WriteError:
    """A one-line WriteError for a failed write of ``path`` (an OSError, or a library's wrapped
    I/O error: safetensors' ``Os { code: 28, ... }``, torch's enforce failure on a full disk)."""
    path = Path(path)
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = re.search(r"Os \{ code: (\d+)", str(e))
        code = int(m.group(1)) if m else (errno.ENOSPC if _disk_full(path) else None)
    if code is None:
        return WriteError(f"cannot write '{path}': {first_line(e)}")
    reason = os.strerror(code)
    hint = HINTS.get(code)
    return WriteError(f"cannot write '{path}': {reason}" + (f" ({hint})" if hint else ""))


def is_write_failure(e: BaseException, path) -> bool:
    """Whether ``e``, raised while writing under ``path``, is the file system's fault (an OSError,
    or a library error wrapping one) rather than a bug to show as it is."""
    return isinstance(e, OSError) or "Os { code:" in str(e) or _disk_full(Path(path))


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open`` / ``mkdir`` would give under the current umask: tempfile
    makes private (0600 / 0700) files, which colleagues sharing a run directory could not read."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_dir(path) -> None:
    """Make a rename in directory ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, fsync'ed
    and renamed over ``path``. On failure the temporary is removed, whatever was at ``path``
    before is untouched, and WriteError says why in one line."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    if durable:
        fsync_dir(path.parent)
    return path


def write_text(path, text: str, durable: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), durable)


@contextlib.contextmanager
def staged(out_dir) -> Iterator[Path]:
    """A temporary directory inside ``out_dir`` for a library to write into; when the block ends
    its files are renamed into ``out_dir`` (each replacing the file of the same name). If the
    block fails, nothing in ``out_dir`` has changed: the staging directory is removed and a
    write failure becomes a one-line WriteError (any other error is raised as it is)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}stage.", dir=out))
    except OSError as e:
        raise write_error(out, e) from None
    try:
        try:
            yield tmp
            for f in tmp.iterdir():  # flushed before any of them replaces an older file
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        except BaseException as e:
            if isinstance(e, Exception) and is_write_failure(e, tmp):
                raise write_error(_failed_file(tmp) or out, e) from None
            raise
        for f in sorted(tmp.iterdir()):
            if f.is_file():  # safetensors writes 0600: a shared run directory needs the umask's mode
                os.chmod(f, default_mode())
            os.replace(f, out / f.name)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _failed_file(tmp: Path) -> Optional[Path]:
    """The name (in the final directory) of the newest file in staging ``tmp``: the one being
    written when the disk filled, as the user will look for it."""
    try:
        files = sorted(tmp.iterdir(), key=lambda f: f.stat().st_mtime_ns)
    except OSError:
        return None
    return tmp.parent / files[-1].name if files else None


def remove_temporaries(directory) -> list:
    """Remove what an interrupted write left in ``directory`` (names starting with TEMP_PREFIX);
    returns the names removed. Only call it while no other philora process writes there."""
    d = Path(directory)
    if not d.is_dir():
        return []
    gone = []
    for p in d.iterdir():
        if p.name.startswith(TEMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone
