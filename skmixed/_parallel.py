"""The one place that schedules chunks of work: in-process threads or a Dask client.

Estimators cut their embarrassingly parallel work into chunks (genes of a many-gene
fit, blocks of pairs of a resampling test or of GLMEIV, cells of a ZINBWaVE
iteration), write one function that does a chunk, and hand both to
:func:`map_chunks` (or to an :class:`Engine` when the same data serve several maps).
Where the chunks run is chosen here, never in the estimator:

- in-process (the default): in order in the calling thread (``n_jobs=1``) or on a pool
  of ``n_jobs`` threads (the kernels release the GIL in numpy / scipy);
- on a Dask cluster: when a ``dask.distributed.Client`` is set for a block of code by
  ``with skmixed.parallel_config(client=client):`` (the habit joblib's
  ``parallel_config(backend="dask")`` gives scikit-learn users), or given to
  :class:`Engine` / :func:`map_chunks` directly.

Results never depend on the engine: the chunks are the same, each chunk's function is
deterministic, and results come back in chunk order, so the caller's reduction runs in
the same order everywhere.

Data on a cluster. A chunk's function is called as ``func(chunk, *shared)``.
``shared`` objects (the per-cell design, the offsets, a block function with the data it
closes over) are sent to the workers once per map (:meth:`Engine.share`:
``client.scatter(..., broadcast=True)``; a copy on every worker because every task
needs them, and the copies on the others survive the loss of a worker), not once per
task. The chunks themselves are small descriptions of where the data are (a gene slice
and an :class:`skmixed._inputs.MatrixReader` that opens a backed ``.h5ad`` file or
computes a slice of a ``dask.array`` on the worker), so the client never reads or
sends the matrix; an in-memory matrix goes as one block per chunk, each to two workers
(:meth:`Engine.share_each`). A worker lost mid-run is handled by Dask: its tasks run
again elsewhere. Everything sent is pickled once (:class:`_Packed`), so that numpy
arrays arrive aligned.

Examples
--------
>>> from skmixed._parallel import map_chunks
>>> list(map_chunks(lambda c, k: [k * v for v in c], [[1, 2], [3]], shared=(10,), n_jobs=2))
[[10, 20], [30]]
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import types
from concurrent.futures import ThreadPoolExecutor

from ._malloc import share_arena
from ._progress import logger

# read-only mapping as the default: a ContextVar's default is shared by every context
_CONFIG = contextvars.ContextVar("skmixed_parallel_config",
                                 default=types.MappingProxyType({"client": None, "n_jobs": None}))
_UNSET = object()


class _Packed:
    """An object sent to Dask workers as one pickle (protocol 4), unpickled once per
    worker on first use. Dask's own serialisation hands numpy arrays over without a
    copy, at whatever offset they sit in the received message: float64 arrays come out
    misaligned, and numpy then runs its operations on them through a slower buffered
    path (about 2 times slower for array arithmetic on the development machine).
    Protocol 4 copies each array into fresh, aligned memory."""

    def __init__(self, obj):
        import cloudpickle  # noqa: PLC0415 (comes with distributed)

        self.payload = cloudpickle.dumps(obj, protocol=4)
        self._obj, self._loaded = None, False

    def __getstate__(self):
        return {"payload": self.payload}

    def __setstate__(self, state):
        self.payload, self._obj, self._loaded = state["payload"], None, False
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if not self._loaded:
                import pickle  # noqa: PLC0415

                self._obj, self._loaded = pickle.loads(self.payload), True
        return self._obj


def _unpacked_call(func, chunk, *shared):
    """``func(chunk, *shared)`` on a worker, with the :class:`_Packed` arguments unpacked."""
    unpack = lambda a: a.get() if isinstance(a, _Packed) else a  # noqa: E731
    return func(unpack(chunk), *map(unpack, shared))


def _is_client(obj) -> bool:
    """A ``dask.distributed.Client`` (duck-typed so that distributed stays optional)."""
    return all(hasattr(obj, a) for a in ("submit", "scatter", "gather", "scheduler_info"))


def _check_n_jobs(n_jobs, arg="n_jobs"):
    if n_jobs is None:
        return
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise ValueError(f"{arg} must be None or a non-zero integer (-1: one thread per CPU), got {n_jobs!r}.")


def _check_client(client, arg="client"):
    if client is not None and client is not False and not _is_client(client):
        raise ValueError(
            f"{arg} must be a dask.distributed.Client (e.g. Client('tcp://host:8786') or "
            f"Client(LocalCluster())), or None; got {type(client).__name__}."
        )


@contextlib.contextmanager
def parallel_config(*, client=_UNSET, n_jobs=_UNSET):
    """Where skmixed runs its chunked work, for the code inside the ``with`` block.

    Parameters
    ----------
    client : dask.distributed.Client or None, optional
        Run the chunks (genes, pairs, cells) as tasks on this Dask cluster. None runs
        them in-process. Not given: keep the enclosing setting.
    n_jobs : int or None, optional
        Threads for the in-process engine (-1: one per CPU; None: the estimator's own
        ``n_jobs``, 1 by default). Ignored while a client is set: the cluster's workers
        and threads decide. Not given: keep the enclosing setting.

    Notes
    -----
    An estimator's or function's own ``client=`` argument wins over this setting; its
    ``n_jobs`` argument, when not None, too. Results do not depend on the engine.

    Examples
    --------
    >>> from skmixed import parallel_config
    >>> from skmixed._parallel import map_chunks
    >>> with parallel_config(n_jobs=2):  # or parallel_config(client=Client(...))
    ...     map_chunks(sum, [[1, 2], [3, 4]])
    [3, 7]
    """
    cur = dict(_CONFIG.get())
    if client is not _UNSET:
        _check_client(client)
        cur["client"] = client
    if n_jobs is not _UNSET:
        _check_n_jobs(n_jobs)
        cur["n_jobs"] = n_jobs
    token = _CONFIG.set(cur)
    try:
        yield
    finally:
        _CONFIG.reset(token)


def local_cluster(n_workers=None, **kwargs):
    """A ``distributed.LocalCluster`` of single-threaded worker processes for skmixed.

    As ``LocalCluster(n_workers, threads_per_worker=1, processes=True, **kwargs)``,
    except that the workers do not get distributed's ``MALLOC_TRIM_THRESHOLD_=65536``:
    setting it fixes glibc's mmap threshold, so every large numpy temporary is mapped
    and unmapped afresh, which made the array arithmetic of the fits 2-5 times slower
    in a worker than in the Python process on the development machine.

    Examples
    --------
    >>> from skmixed._parallel import local_cluster
    >>> callable(local_cluster)
    True
    """
    import dask  # noqa: PLC0415
    import distributed  # noqa: PLC0415

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    default = env.pop("MALLOC_TRIM_THRESHOLD_", None)
    # distributed's nanny writes its pre-spawn variables into this process's os.environ,
    # so a plain LocalCluster made earlier leaves the setting for every later worker to
    # inherit: undo that (only distributed's own value; a user's other value stays)
    if default is not None and os.environ.get("MALLOC_TRIM_THRESHOLD_") == str(default):
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    kwargs.setdefault("dashboard_address", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, **kwargs)


@contextlib.contextmanager
def dask_client(address, *, n_workers=None):
    """Connect to a Dask scheduler and run skmixed's chunks there inside the block.

    Parameters
    ----------
    address : str or None
        ``"local"``: start a ``LocalCluster`` of worker processes on this machine (one
        thread each), closed at the end of the block; a scheduler address such as
        ``"tcp://10.0.0.5:8786"`` (``dask scheduler`` on a head node, or a
        dask-jobqueue cluster's ``scheduler_address``): connect to it. None: nothing
        (in-process).
    n_workers : int, optional
        Worker processes of the ``"local"`` cluster (default: one per CPU).

    Yields
    ------
    client : dask.distributed.Client or None
        Also set as :func:`parallel_config`'s client inside the block.

    Examples
    --------
    >>> from skmixed._parallel import dask_client
    >>> with dask_client(None) as client:
    ...     client is None
    True
    """
    if address is None:
        yield None
        return
    if not isinstance(address, str) or not (address == "local" or "://" in address):
        raise ValueError(f"scheduler must be 'local' or an address such as 'tcp://host:8786', got {address!r}.")
    try:
        import distributed  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError("running on a Dask scheduler needs dask.distributed: pip install 'skmixed[dask]'.") from exc
    with contextlib.ExitStack() as stack:
        if address == "local":
            cluster = stack.enter_context(local_cluster(n_workers))
            client = stack.enter_context(distributed.Client(cluster))
        else:
            try:
                client = stack.enter_context(distributed.Client(address, timeout="20s"))
            except (OSError, TimeoutError) as exc:
                raise ValueError(f"cannot reach the Dask scheduler at {address!r}: {exc}") from exc
        logger.info("Dask scheduler %s, %d workers", client.scheduler.address,
                    len(client.scheduler_info().get("workers", {})))
        with parallel_config(client=client):
            yield client


def get_config() -> dict:
    """The current ``{"client": ..., "n_jobs": ...}`` of :func:`parallel_config`."""
    return dict(_CONFIG.get())


def _threads(n_jobs) -> int:
    if n_jobs is None:
        return 1
    return max(1, (os.cpu_count() or 1) + 1 + n_jobs) if n_jobs < 0 else n_jobs


class Engine:
    """Runs chunks in-process or on a Dask client; see the module's docstring.

    Parameters
    ----------
    n_jobs : int or None
        In-process threads (-1: one per CPU). None: :func:`parallel_config`'s, else 1.
    client : dask.distributed.Client, None or False
        None: :func:`parallel_config`'s client, if any; False: in-process whatever
        the configuration (e.g. work on a GPU).

    Use it as a context manager (its thread pool and the data it shared on a cluster
    are released at exit). ``engine.distributed`` says which engine runs.
    """

    def __init__(self, n_jobs=None, client=None):
        _check_n_jobs(n_jobs)
        _check_client(client)
        cfg = _CONFIG.get()
        self.client = None if client is False else client if client is not None else cfg["client"]
        self.n_jobs = n_jobs if n_jobs is not None else cfg["n_jobs"]
        self._pool = None
        self._shared = []
        self._packed = {}  # key of a shared future -> what it holds, to send again if it is lost
        self._lock = threading.Lock()

    @property
    def distributed(self) -> bool:
        return self.client is not None

    @property
    def workers(self) -> int:
        """How many chunks can run at once (threads, or the cluster's worker threads)."""
        if self.client is None:
            return _threads(self.n_jobs)
        info = self.client.scheduler_info()
        return max(1, sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values()))

    def share(self, obj):
        """A handle to ``obj`` for the ``shared`` arguments of :meth:`map`: ``obj``
        itself in-process; on a cluster, a future of one copy per worker (sent once)."""
        if self.client is None:
            return obj
        # a one-element list: scatter sends the object whole (a list or dict would be
        # scattered element by element)
        packed = _Packed(obj)
        fut = self.client.scatter([packed], broadcast=True, hash=False)[0]
        self._shared.append(fut)
        self._packed[fut.key] = (packed, True)
        return fut

    def share_each(self, objs, replicas=1):
        """Handles to several objects spread over the workers, e.g. the blocks of an
        in-memory matrix, or per-chunk data kept on the cluster across the iterations of
        an algorithm; pass them as the chunks of :meth:`map`. In-process: the objects
        themselves. Each object is sent on its own (an iterator is consumed one object
        at a time, so the caller need not hold them all), to ``replicas`` workers:
        with 1, an object whose worker dies is lost and so is the map; with 2, one
        worker's death is survived."""
        if self.client is None:
            return list(objs)
        futs = []
        for obj in objs:
            packed = _Packed(obj)
            fut = self.client.scatter([packed], broadcast=False, hash=False)[0]
            futs.append(fut)
            self._packed[fut.key] = (packed, False)
        n = min(int(replicas), self.workers)
        if n > 1 and futs:
            self.client.replicate(futs, n=n)
        self._shared.extend(futs)
        return futs

    def map(self, func, chunks, *shared):
        """``func(chunk, *shared)`` for every chunk; an iterator of the results in chunk
        order (the caller can advance a progress bar and keep memory to one result).
        With a client, every chunk is submitted at once and the results gathered in order."""
        chunks = list(chunks)
        if not chunks:
            return iter(())
        if self.client is not None:
            return self._map_client(func, chunks, shared)
        if _threads(self.n_jobs) == 1 or len(chunks) == 1:
            return (func(c, *shared) for c in chunks)
        with self._lock:
            if self._pool is None:
                share_arena()  # per-thread arenas re-fault their pages chunk after chunk
                self._pool = ThreadPoolExecutor(max_workers=_threads(self.n_jobs))
        return self._pool.map(lambda c: func(c, *shared), chunks)

    def _map_client(self, func, chunks, shared):
        logger.debug("%d chunks on the Dask cluster at %s", len(chunks), self.client.scheduler.address)
        futures = [self.client.submit(_unpacked_call, func, c, *shared, pure=False) for c in chunks]

        def results():
            try:
                for i, fut in enumerate(futures):
                    yield self._result(fut, func, chunks[i], shared)
                    futures[i] = None  # the worker may drop it
                    fut.release()
            finally:
                for fut in futures:
                    if fut is not None:
                        fut.cancel()

        return results()

    def _resend(self, handle):
        """``handle`` itself, or the same object scattered again if the cluster lost it."""
        if getattr(handle, "key", None) not in self._packed or handle.status == "finished":
            return handle
        packed, broadcast = self._packed[handle.key]
        fut = self.client.scatter([packed], broadcast=broadcast, hash=False)[0]
        self._shared.append(fut)
        self._packed[fut.key] = (packed, broadcast)
        return fut

    def _result(self, fut, func, chunk, shared, retries=3):
        """The task's result. Dask reruns the tasks of a lost worker, but scattered data have
        no lineage: when the scheduler dropped a replica it still counted on, the task is
        cancelled ("already forgotten"); then the data it needs are sent again and the
        task resubmitted (the same deterministic function of the same chunk)."""
        from concurrent.futures import CancelledError  # noqa: PLC0415

        for attempt in range(retries + 1):
            try:
                return fut.result()
            except CancelledError:
                if attempt == retries:
                    raise
                logger.warning("a Dask task was lost with its worker; resubmitting it")
                args = [self._resend(a) for a in (chunk, *shared)]
                fut = self.client.submit(_unpacked_call, func, *args, pure=False)
        return fut.result()  # not reached

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fut in self._shared:
            fut.release()
        self._shared = []
        self._packed = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def call_item(i, func, items):
    """``func(items[i])``. ``engine.map(call_item, range(len(items)), engine.share(func),
    engine.share(items))`` runs a closure over its chunks with the closure and the
    chunks sent to a cluster once, and only a number per task."""
    return func(items[i])


def map_chunks(func, chunks, *, shared=(), n_jobs=None, client=None):
    """``func(chunk, *shared)`` for every chunk, in-process or on a Dask client; a list
    of the results in chunk order.

    Parameters
    ----------
    func : callable
        Picklable by cloudpickle when a client runs it (module-level functions and
        closures over small objects; big arrays go through ``shared``).
    chunks : iterable
        Small descriptions of each piece of work (index arrays, slices, readers).
    shared : tuple
        Arguments every chunk needs, sent to a cluster once.
    n_jobs, client :
        As :class:`Engine`.
    """
    with Engine(n_jobs=n_jobs, client=client) as eng:
        handles = tuple(eng.share(s) for s in shared)
        return list(eng.map(func, chunks, *handles))
