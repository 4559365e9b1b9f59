"""Ctrl-C during training: the first one asks the loop to stop after the current batch."""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`fit` after Ctrl-C, once ``last.pt`` is saved (``saved`` says whether the
    state could be saved; ``epoch``/``step`` say where training will continue)."""

    def __init__(self, run_dir: Path, epoch: int, step: int, saved: bool = True):
        super().__init__(f"training interrupted in epoch {epoch + 1}, after {step} batches")
        self.run_dir, self.epoch, self.step, self.saved = Path(run_dir), epoch, step, saved


class InterruptFlag:
    """While active (main thread only), the first Ctrl-C sets ``requested`` so training stops at
    the end of the current batch; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
