"""Host-side settings for running on the CPU: glibc's allocator, tuned for XLA's buffers.

XLA's CPU runtime allocates the buffers of a jitted call with ``malloc``: the outputs that are
not donated, and the temporaries, which in a train step are as large as the parameters
(gradients, optimiser updates): 4 MiB per 1024×1024 weight matrix, five times that for a K = 5
ensemble stacked on one axis. glibc serves such blocks with ``mmap`` and returns them with
``munmap`` when they are freed, so every step faults in all of those pages afresh; its adaptive
threshold adapts only to sizes it has just freed, which misses part of a step's buffers.
:func:`tune_allocator` keeps blocks up to 32 MiB on the heap (``M_MMAP_THRESHOLD``), returns
freed memory to the system only above 1 GiB at the top of the heap (``M_TRIM_THRESHOLD``) and
grows the heap 256 MiB at a time (``M_TOP_PAD``, address space only until touched). Its effect
on the optimiser update and on whole train steps is recorded in BENCHMARKS.md.

The cost is memory the process keeps instead of returning (bounded by the trim threshold).
``train.py``, ``certify.py`` and the benchmarks call :func:`tune_allocator` at start-up; library
users may call it too. ``LINF_JAX_TUNE_MALLOC=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "LINF_JAX_TUNE_MALLOC"
# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 256 << 20}

_applied: bool | None = None


def tune_allocator() -> bool:
    """Applies :data:`SETTINGS` with ``mallopt`` once per process; True if they are in effect
    (Linux with glibc, not turned off by ``LINF_JAX_TUNE_MALLOC=0``), False otherwise."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _applied
