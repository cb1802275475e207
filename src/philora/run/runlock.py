"""One trainer per output directory: an OS-level lock held for the run's lifetime.

``output_dir/.philora.lock`` is locked with ``fcntl.flock`` and holds the holder's pid and host;
it is removed when the run ends. The kernel drops the lock when the holding process exits,
however it exits (a crash, kill -9), so a lock file left behind by a dead run is simply taken
over: no stale-lock heuristics. (A lock taken on a file that was meanwhile removed is retried on
the new file, so removing it on release is safe.) Two runs on one directory would interleave their metrics,
configs and checkpoints, and a ``--resume`` beside a live run would train the same steps twice.
Hand-written: ``fcntl`` is the whole mechanism (a lock-file package would add nothing we use).
On NFS, Linux maps ``flock`` to a byte-range lock the server keeps, so it works there too.
"""

import os
import socket
from pathlib import Path
from typing import Optional

from ..core.errors import PhiloraError

try:
    import fcntl
except ImportError:  # Windows: no flock; philora runs there without the lock
    fcntl = None

LOCK_NAME = ".philora.lock"


class LockedError(PhiloraError):
    """``output_dir`` is in use by another live philora process; the message names its pid."""


class RunLock:
    """The held lock on one output directory; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: Optional[int], created: bool = False):
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked: a waiting process then retries on a new file
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None
        if self.created:  # a run that stopped before writing anything leaves no empty directory
            try:
                self.path.parent.rmdir()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder(path) -> str:
    """Who holds the lock, as written in the lock file ('pid 123 on host x'), or '' if unknown."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def acquire(output_dir) -> RunLock:
    """Lock ``output_dir`` (created if missing) for this process, or raise a one-line
    LockedError naming the live holder. The lock is not inherited by child processes."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PhiloraError(f"training_config.output_dir '{out}' exists and is not a directory")
    path = out / LOCK_NAME
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PhiloraError(f"training_config.output_dir '{out}': cannot create it: {e.strerror or e}") from None
    if fcntl is None:
        return RunLock(path, None)
    while True:
        try:
            fd = os.open(str(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise PhiloraError(f"training_config.output_dir '{out}': cannot create its lock file "
                               f"{LOCK_NAME}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = holder(path) or "another process"
            raise LockedError(f"output_dir '{out}' is in use by another philora run ({who}); wait for "
                              f"it to finish or stop it, or set training_config.output_dir") from None
        except OSError as e:  # a file system without locks (some NFS mounts): train, but say so
            print(f"philora: warning: cannot lock '{path}' ({e.strerror or e}): a second run on this "
                  f"output_dir would not be stopped", flush=True)
            break
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # locked the file that is there now
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we locked it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    except OSError:
        pass  # the lock holds either way; only the message to a second run would be vaguer
    return RunLock(path, fd, created)
