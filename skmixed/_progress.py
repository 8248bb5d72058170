"""Progress bars for long work, and the package's logger.

One rule for every estimator: ``verbose=0`` (the default) is silent; ``verbose >= 1``
shows a `tqdm <https://tqdm.github.io>`_ bar on standard error (genes or pairs done
out of the total, or iterations with the objective, and an ETA). Without tqdm, or
with ``verbose=0``, the bar is a no-op object with the same methods, so the calling
code never branches. Details go to the ``"skmixed"`` :mod:`logging` logger, which is
silent unless the application configures logging (the command line does).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("skmixed")


class _NoBar:
    """The no-op stand-in for a tqdm bar."""

    n = 0
    total = None

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, s="", refresh=True):
        pass

    def refresh(self):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress(*, total=None, desc=None, unit="it", verbose=0):
    """A progress bar: a tqdm bar when ``verbose`` and tqdm is installed, else a no-op.

    Parameters
    ----------
    total : int or None
        Expected number of units (None: no percentage or ETA, a count only).
    desc : str or None
        Label in front of the bar, e.g. ``"PoissonGLMM genes"``.
    unit : str, default="it"
        What is counted (``"gene"``, ``"pair"``, ``"iter"``).
    verbose : int or bool, default=0
        0 or False: no bar.

    Returns
    -------
    bar
        An object with ``update(n)``, ``set_postfix_str(s)``, ``refresh()``, ``close()``,
        a settable ``total`` and context management (a ``tqdm.tqdm`` instance, or a silent stand-in).

    Examples
    --------
    >>> from skmixed._progress import progress
    >>> with progress(total=3, desc="genes", verbose=0) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    >>> bar.n
    3
    """
    if not verbose:
        return _NoBar()
    import importlib  # noqa: PLC0415

    # tqdm.auto: a widget in notebooks, text elsewhere; its notebook bar raises
    # ImportError where ipywidgets is missing, and then the text bar serves
    for module in ("tqdm.auto", "tqdm"):
        try:
            return importlib.import_module(module).tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        except ImportError:
            continue
    logger.debug("tqdm is not installed: no progress bar")  # a dependency; a stripped environment still runs
    return _NoBar()


def check_verbose(verbose, arg: str = "verbose") -> int:
    """``verbose`` as a non-negative int; ``ValueError`` naming it otherwise.

    Examples
    --------
    >>> check_verbose(True)
    1
    """
    if isinstance(verbose, bool):
        return int(verbose)
    try:
        value = int(verbose)
    except (TypeError, ValueError):
        value = -1
    if value != verbose or value < 0:
        raise ValueError(f"{arg} must be a non-negative integer (0: silent), got {verbose!r}.")
    return value
