"""Preemption: SIGTERM (what Slurm, Kubernetes and spot instances send before they kill) and
SIGINT (Ctrl-C) end a run at a step boundary with a checkpoint instead of losing the work done
since the last one.

While the loop trains (:meth:`SignalGuard.defer`), the first signal only sets a flag. The loop
reads it after each optimizer step (under torchrun every rank reads the sum of all ranks' flags,
so all stop after the same step), saves a checkpoint, and raises :class:`Interrupted`, which the
CLI prints as one line and turns into exit status 143 (SIGTERM) or 130 (SIGINT). A second signal
exits at once without saving (the latest checkpoint stays). A repeat within ``DUPLICATE_S`` of
the first is the same request, not a second one: Slurm signals every process of a job and
torchrun forwards the signal again, so a worker sees two. Outside the loop (:meth:`immediate`:
loading, or after the adapter is saved) there is nothing a checkpoint would keep, so a signal
raises Interrupted at once.

Handlers exist only in the main thread (Python allows no other); elsewhere the guard does nothing
and signals keep their default effect. The previous handlers are restored when the guard exits.
Hand-written: the standard ``signal`` module is the whole mechanism.
"""

import os
import signal
import threading
import time
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_S = 1.0


class Interrupted(BaseException):
    """The run stopped on a signal; ``str()`` is the one line to print. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way up swallows it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal killed


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _say(line: str) -> None:
    # os.write: print() inside a handler can interrupt another print and fail as re-entrant.
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


class SignalGuard:
    """SIGTERM / SIGINT handling for one run; use as a context manager. ``announce``: whether
    this process prints (rank 0 only under torchrun)."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum: Optional[int] = None
        self.deferring = False
        self.message = "stopped before training started; nothing was saved"
        self._first = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether a signal has arrived (the loop stops after the current step)."""
        return self.signum is not None

    def defer(self) -> None:
        """From now on a signal only sets the flag: the loop checkpoints, then stops."""
        self.deferring = True

    def immediate(self, message: str) -> None:
        """From now on a signal stops the run at once with ``message``; raises now if one came
        while deferring."""
        self.deferring, self.message = False, message
        if self.signum is not None:
            raise Interrupted(self.signum, f"{signal_name(self.signum)}: {message}")

    def interrupted(self, message: str) -> Interrupted:
        """The Interrupted to raise for a stop the ranks agreed on (SIGTERM if this rank itself
        saw no signal)."""
        signum = self.signum or signal.SIGTERM
        return Interrupted(signum, f"{signal_name(signum)}: {message}")

    def _handle(self, signum, frame) -> None:
        name, now = signal_name(signum), time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            if not self.deferring:
                raise Interrupted(signum, f"{name}: {self.message}")
            if self.announce:
                _say(f"philora: {name} received: stopping after this step with a checkpoint "
                     f"({name} again to exit at once without one)")
            return
        if now - self._first < DUPLICATE_S:
            return  # the scheduler's and torchrun's copies of one request
        if self.announce:
            _say(f"philora: second {name}: exiting at once; the latest checkpoint is kept")
        os._exit(128 + signum)
