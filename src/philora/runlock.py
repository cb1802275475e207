"""One trainer per output directory: an OS-level lock held for the run's lifetime.

``output_dir/.philora.lock`` is locked with ``fcntl.flock`` and holds the holder's pid and host.
The kernel drops the lock when the holding process exits, however it exits (a crash, kill -9,
a lost node on a local file system), so a lock file left behind by a dead run is simply taken
over: no stale-lock heuristics. Two runs on one directory would interleave their metrics,
configs and checkpoints, and a ``--resume`` beside a live run would train the same steps twice.
Hand-written: ``fcntl`` is the whole mechanism (a lock-file package would add nothing we use).
On NFS, Linux maps ``flock`` to a byte-range lock the server keeps, so it works there too.
"""

import os
import socket
from pathlib import Path
from typing import Optional

from .errors import PhiloraError

try:
    import fcntl
except ImportError:  # Windows: no flock; philora runs there without the lock
    fcntl = None

LOCK_NAME = ".philora.lock"


class LockedError(PhiloraError):
    """``output_dir`` is in use by another live philora process; the message names its pid."""


class RunLock:
    """The held lock on one output directory; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a dead holder's pid must not be shown as the holder
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None

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
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK_NAME
        if fcntl is None:
            return RunLock(path, None)
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise PhiloraError(f"training_config.output_dir '{out}': cannot create it or its lock file: "
                           f"{e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        who = holder(path) or "another process"
        raise LockedError(f"output_dir '{out}' is in use by another philora run ({who}); wait for it "
                          f"to finish or stop it, or set training_config.output_dir") from None
    except OSError as e:  # a file system without locks (some NFS mounts): train, but say so
        print(f"philora: warning: cannot lock '{path}' ({e.strerror or e}): a second run on this "
              f"output_dir would not be stopped", flush=True)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    except OSError:
        pass  # the lock holds either way; only the message to a second run would be vaguer
    return RunLock(path, fd)
