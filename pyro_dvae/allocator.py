"""Keep freed memory for reuse instead of handing it back to the operating system (glibc only).

PyTorch's CPU tensors come from ``malloc``.  glibc serves large blocks with ``mmap`` and returns
them with ``munmap`` when freed, and trims the heap when its free top exceeds a threshold, so every
training step maps its large buffers afresh and pays a page fault for each 4 KiB page it touches:
about 23,000 faults per step for STORN at paper sizes (oneDNN's LSTM workspaces, the (32, 150,
257) activations), 13-20 % of the step on this machine.  :func:`retain_freed_memory` sets
``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` high, so freed blocks stay in the heap and the next
step reuses them (the same as starting Python with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set).  The process keeps its peak memory instead of shrinking between
steps.  ``pyro-dvae fit``, ``evaluate``, ``resynth`` and ``generate`` call it, and
:func:`pyro_dvae.train.fit` when it starts; elsewhere (other C libraries, other systems) it does
nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the settings (bytes); glibc caps the mmap threshold at 32 MiB on some versions, tried next
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 1 << 30

_DONE = [None]


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory (idempotent).  Returns whether it applied;
    ``PYRO_DVAE_MALLOC=default`` in the environment leaves the allocator as it is."""
    if _DONE[0] is not None:
        return _DONE[0]
    _DONE[0] = False
    if os.environ.get("PYRO_DVAE_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not any(mallopt(_M_MMAP_THRESHOLD, n) for n in MMAP_THRESHOLDS):
        return False
    _DONE[0] = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _DONE[0]


def retained() -> bool:
    """Whether :func:`retain_freed_memory` has applied in this process."""
    return bool(_DONE[0])
