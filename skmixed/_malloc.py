"""glibc's allocator tuned for many short-lived arrays of 0.1-30 MB (once per process).

A fit that evaluates its likelihood pass after pass over (cells, columns) arrays allocates
and frees thousands of temporaries of that size. glibc serves blocks above its mmap
threshold with fresh pages from the kernel and hands freed memory at the top of its heap
back once it exceeds the trim threshold; each reuse then costs a minor page fault per 4 KB.
For one GLM-EIV pair of 50,000 cells that was 6,000-7,700 faults and 20-40% of the CPU
time. Raising both thresholds to the maxima glibc's own dynamic rule reaches (mmap 32 MB,
trim 64 MB) lets the temporaries reuse the pages of the previous ones. The price: up to
64 MB of freed memory may stay with the process instead of returning to the system, and
glibc's dynamic adjustment of the thresholds stops (for the whole process: the allocator
has no per-call setting).

Nothing happens on other platforms or C libraries, or with ``SKMIXED_NO_MALLOPT=1`` in the
environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what the dynamic rule pairs with it

_LOCK = threading.Lock()
_DONE = []


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds once per process; returns whether they are set.

    Estimators whose fits allocate many large temporaries call it at the start of ``fit``
    (:class:`skmixed.GLMEIV`); ``SKMIXED_NO_MALLOPT=1`` opts out.

    Examples
    --------
    >>> from skmixed._malloc import tune_malloc
    >>> isinstance(tune_malloc(), bool)
    True
    """
    with _LOCK:
        if _DONE:
            return _DONE[0]
        ok = False
        if not os.environ.get("SKMIXED_NO_MALLOPT") and sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            except (OSError, AttributeError):  # pragma: no cover - not glibc
                mallopt = None
            if mallopt is not None:
                ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        _DONE.append(ok)
        return ok
