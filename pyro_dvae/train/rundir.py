"""The run folder's state: a lock while a run writes it, and the truthful status of its run.

A run holds ``.lock`` in its folder from start to end: an exclusive ``flock`` on the file, which
also names the holder (pid, host, start time).  The kernel releases a ``flock`` when its process
dies, however it dies, so a lock file that can be locked again is stale: a later run takes it
over (and removes the temporary files the dead process left, :func:`pyro_dvae.atomic.
remove_orphans`).  Where the file system has no ``flock``, the pid is checked instead (same host
only).  ``history.json`` says ``"running"`` while a run trains; :func:`run_status` reports a
``"running"`` with no live holder as ``"crashed"`` (the process was killed without a word).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Tuple, Union

from ..atomic import pid_alive
from .checkpoint import CheckpointError

LOCK_NAME = ".lock"


class RunFolderBusy(CheckpointError):
    """Another live process holds the run folder's lock; the message is one line."""


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
    """"pid 123 on host h (pyro-dvae fit, since 2026-12-01 21:40:00 UTC)" for a lock holder."""
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"({holder.get('command', 'pyro-dvae')}, since {when})")


def _holder_alive(holder: dict) -> bool:
    """Without flock: whether the holder named in the file still runs (other hosts: assumed)."""
    if not holder.get("pid"):
        return False
    return holder.get("host") != socket.gethostname() or pid_alive(int(holder["pid"]))


class RunFolderLock:
    """The exclusive lock of a run folder (:meth:`acquire` / :meth:`release`, or ``with``).

    ``previous`` is what the file said about an earlier holder that has died (a stale lock taken
    over), else ``None``.
    """

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.previous: Optional[dict] = None
        self._fd: Optional[int] = None

    def acquire(self) -> "RunFolderLock":
        """Take the lock or raise :class:`RunFolderBusy` naming the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = _try_flock(fd)
                holder = _read_holder(self.path)
                if locked is None:  # no flock here: judge by the pid
                    locked = not _holder_alive(holder)
                if not locked:
                    raise RunFolderBusy(
                        f"{self.folder} is in use by another run: {describe_holder(holder)}; "
                        "wait for it to end or choose another output directory")
                if _same_file(fd, self.path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was replaced while we locked it: lock the new one
        self.previous = holder or None
        command = " ".join(["pyro-dvae"] + sys.argv[1:2]) if sys.argv else "pyro-dvae"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let go of the lock."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _try_flock(fd: int) -> Optional[bool]:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock_holder(folder: Union[str, Path]) -> Optional[dict]:
    """The live holder of ``folder``'s lock (its pid, host, start time), or ``None``."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        locked = _try_flock(fd)
        holder = _read_holder(path)
        if locked is None:
            return holder if _holder_alive(holder) else None
        return None if locked else (holder or {"pid": "?"})
    finally:
        os.close(fd)  # (closing releases a flock this probe took)


def run_status(folder: Union[str, Path]) -> Tuple[Optional[str], str]:
    """(status, explanation) of the run in ``folder``: ``history.json``'s status
    (``"running"``, ``"finished"``, ``"early_stopped"``, ``"interrupted"``, ``"crashed"``), except
    that a ``"running"`` without a live lock holder is ``"crashed"``; ``(None, ...)`` when the
    folder has no readable history."""
    folder = Path(folder)
    try:
        history = json.loads((folder / "history.json").read_text())
        status = history["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{folder} has no readable history.json"
    if status != "running":
        reason = history.get("error")
        return status, (f"{status} ({reason})" if reason else status)
    holder = lock_holder(folder)
    if holder is not None:
        return "running", f"running ({describe_holder(holder)})"
    return "crashed", ("crashed: history.json says running, but no process holds the run "
                       "folder (killed without saving, for example by kill -9 or out of memory)")
