"""Atomic file writes: a temporary file in the target folder, then ``os.replace``.

A reader (or a crash) sees either the old file or the complete new one, never a part.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union


def atomic_write(path: Union[str, Path], write: Callable) -> None:
    """Write ``path`` through ``write(file)`` (a binary file object) into the temporary file
    ``.NAME.PID.tmp`` next to it, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
