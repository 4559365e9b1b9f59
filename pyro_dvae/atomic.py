"""Atomic file writes: a temporary file in the target folder, then ``os.replace``.

A reader (or a crash) sees either the old file or the complete new one, never a part.  The
temporary file is created with mode ``0o666`` less the process's umask (``tempfile.mkstemp``
would make it ``0o600``, and ``os.replace`` keeps that mode), so every output file gets the mode
an ordinary ``open(path, "w")`` would give it: ``0o644`` under the usual umask 022, group-readable
on the shared file systems of multi-node runs.  Its name, ``.NAME.PID.XXXXXXXX.tmp``, tells which
process made it; :func:`remove_orphans` deletes those whose process is gone.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from pathlib import Path
from typing import Callable, List, Union

PathLike = Union[str, Path]
_TEMP = re.compile(r"^\..+\.(\d+)(\.[0-9a-f]{8})?\.tmp$")  # (older versions: no random part)


def _make_temp(path: PathLike, make: Callable) -> Path:
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            make(tmp)
            return tmp
        except FileExistsError:  # pragma: no cover (2^-32 per try)
            continue


def create_temp(path: PathLike) -> Path:
    """Create an empty temporary file next to ``path`` (mode ``0o666`` less the umask) and return
    its path; the caller writes it, then ``os.replace``-s it onto ``path`` or deletes it."""
    return _make_temp(path, lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                                       0o666)))


def create_temp_dir(path: PathLike) -> Path:
    """Create an empty temporary folder next to ``path`` (mode ``0o777`` less the umask, where
    ``tempfile.mkdtemp`` gives ``0o700``) to be renamed onto ``path`` once complete."""
    return _make_temp(path, lambda p: os.mkdir(p, 0o777))


class _RecordingFile:
    """A binary file that remembers the ``OSError`` of a failed write: ``torch.save`` turns it into
    a ``RuntimeError`` ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: PathLike, write: Callable) -> None:
    """Write ``path`` through ``write(file)`` (a binary file object) into a temporary file next to
    it (:func:`create_temp`), flush it to disk, then rename it into place.  A failed write removes
    the temporary file and raises the ``OSError`` of the write itself (for example ``ENOSPC``)."""
    path = Path(path)
    tmp = create_temp(path)
    try:
        with open(tmp, "wb") as raw:
            f = _RecordingFile(raw)
            try:
                write(f)
                raw.flush()
                os.fsync(raw.fileno())
            except Exception:
                if f.error is not None:
                    raise f.error from None
                raise
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (also one of another user)."""
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def remove_orphans(folder: PathLike) -> List[Path]:
    """Delete the temporary files of :func:`create_temp` in ``folder`` whose process no longer
    runs (left by a killed process); returns the deleted paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
