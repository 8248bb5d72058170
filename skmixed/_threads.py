"""One BLAS thread for code whose matrix products are thin.

The batched solvers multiply tall, narrow matrices (n cells by a few covariates); a
multithreaded BLAS gains little there and, beside the package's own threads or other
work on the machine, its threads spin: a 200,000 x 6 by 200,000 x 40 product took
0.02 s with one thread and 0.1-9 s with two on a loaded 2-core machine.
``threadpoolctl.threadpool_limits`` finds the loaded BLAS libraries by reading the
process's memory map on every call (about 3 ms, as long as a GLM-EIV fit of one small
pair); the controller is built once here and reused.
"""

from __future__ import annotations

import threading

from threadpoolctl import ThreadpoolController

_LOCK = threading.Lock()
_CONTROLLER = None


def one_blas_thread():
    """A context manager limiting the BLAS libraries to one thread.

    Examples
    --------
    >>> import numpy as np
    >>> with one_blas_thread():
    ...     float(np.ones((3, 2)).T @ np.ones(3) @ np.ones(2))
    6.0
    """
    global _CONTROLLER
    with _LOCK:
        if _CONTROLLER is None:
            _CONTROLLER = ThreadpoolController()
        controller = _CONTROLLER
    return controller.limit(limits=1, user_api="blas")
