"""Ctrl-C (SIGINT) and SIGTERM during training: the first asks the loop to stop after the batch.

SIGTERM is what SLURM, Kubernetes and torchrun send before they kill a process (and on
preemption); it is handled like Ctrl-C, so a terminated run saves ``last.pt`` at the position in
the epoch and can be resumed exactly.  A second signal abandons the batch at once, except while a
file is being written (:meth:`InterruptFlag.deferred`): then it takes effect once the file is
complete, so nothing is left half-written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Optional

#: the signals that stop training
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`fit` after Ctrl-C or SIGTERM, once ``last.pt`` is saved (``saved`` says
    whether the state could be saved; ``epoch``/``step`` say where training will continue;
    ``signum`` is the signal, ``signal.SIGINT`` for Ctrl-C)."""

    def __init__(self, run_dir: Path, epoch: int, step: int, saved: bool = True,
                 signum: int = signal.SIGINT):
        super().__init__(f"training interrupted in epoch {epoch + 1}, after {step} batches")
        self.run_dir, self.epoch, self.step, self.saved = Path(run_dir), epoch, step, saved
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


class InterruptFlag:
    """While active (main thread only), the first SIGINT or SIGTERM sets ``requested`` (and
    ``signum``) so that training stops at the end of the current batch; a second one raises
    KeyboardInterrupt at once, or, inside :meth:`deferred`, when the block ends.  ``notice``,
    if set, is written to stderr when a first SIGTERM arrives (data-parallel runs: a rank that
    torchrun stops says so, whatever happens next)."""

    def __init__(self, notice: Optional[str] = None):
        self.requested = False
        self.signum: int = signal.SIGINT
        self.notice = notice
        self._hard = False
        self._defer = 0
        self._old = {}

    def _handler(self, signum, frame):
        if not self.requested:
            self.requested, self.signum = True, signum
            if self.notice and signum == signal.SIGTERM:
                os.write(2, (self.notice.format(signal=signal.Signals(signum).name) + "\n")
                         .encode())
            return
        self._hard = True
        if not self._defer:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self, final: bool = False):
        """A block (a file write) that a second signal does not cut short: it raises
        KeyboardInterrupt when the block ends instead, or never if ``final`` (already
        stopping)."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if self._hard and not self._defer and not final:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False
