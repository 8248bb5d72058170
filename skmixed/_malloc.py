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

The threads of an in-process pool (``n_jobs`` > 1) meet the same cost in another form:
glibc gives each thread its own arena, whose heaps it shrinks and unmaps as their
temporaries are freed, so every chunk re-faults its pages: a 6,000-gene PoissonGLMM fit
on two threads took 336,000 minor page faults and 2.2 s of system time (one thread:
4,000 and 0.01 s). :func:`share_arena` limits the process to glibc's main arena (one
lock for every thread's ``malloc``; numpy allocates rarely, by whole arrays): 6,000
faults.

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
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what the dynamic rule pairs with it

_LOCK = threading.Lock()
_DONE = []


def _mallopt():
    """glibc's ``mallopt``, or None (another platform or C library, or opted out)."""
    if os.environ.get("SKMIXED_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


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
    return _set_once(_DONE, [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)])


_ARENA = []


def share_arena() -> bool:
    """Limit glibc to its main arena, once per process; returns whether it is set.

    :class:`skmixed._parallel.Engine` calls it before it starts a pool of threads (arenas
    are made when a thread first allocates, so this must come first);
    ``SKMIXED_NO_MALLOPT=1`` opts out.

    Examples
    --------
    >>> from skmixed._malloc import share_arena
    >>> isinstance(share_arena(), bool)
    True
    """
    return _set_once(_ARENA, [(M_ARENA_MAX, 1)])


def _set_once(done, settings):
    """``mallopt(param, value)`` for each of ``settings``, the first time only (``done``
    keeps whether they were set; later calls return it)."""
    with _LOCK:
        if not done:
            mallopt = _mallopt()
            done.append(mallopt is not None and all(bool(mallopt(k, v)) for k, v in settings))
        return done[0]
