"""ZINBWaVE on Dask (issue 15, point 1): each iteration's passes over the cells run as
tasks on a LocalCluster of 2 worker processes, and the per-gene sums are reduced on the
client in chunk order, so the objective path equals the in-process one."""

import os
import pickle
import warnings

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

import skmixed.zinb._chunks as chunks_module  # noqa: E402
from skmixed import ZINBWaVE, parallel_config  # noqa: E402
from skmixed._parallel import local_cluster  # noqa: E402
from skmixed.datasets import make_zinb_counts  # noqa: E402

pytestmark = pytest.mark.slow  # the cluster takes several seconds to start on a loaded machine

KW = {"random_state": 0, "max_iter": 6, "tol": 0.0, "batch_size": 90}


@pytest.fixture(scope="module")
def client():
    with local_cluster(2, host="127.0.0.1", worker_dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.fixture(scope="module")
def sim():
    return make_zinb_counts(400, 90, n_clusters=3, random_state=4)


def _fit(Y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter is reached on purpose
        return ZINBWaVE(3, **{**KW, **kw}).fit(Y)


@pytest.mark.parametrize("common", [True, False])
def test_distributed_objective_path_equals_in_process(client, sim, common):
    ref = _fit(sim.counts, common_dispersion=common)
    with parallel_config(client=client):
        m = _fit(sim.counts, common_dispersion=common)
    np.testing.assert_allclose(m.objective_history_, ref.objective_history_, rtol=1e-8)
    np.testing.assert_allclose(m.W_, ref.W_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(m.zeta_, ref.zeta_, rtol=1e-8)
    assert np.all(np.diff(m.objective_history_) >= -1e-9 * abs(m.penalized_loglik_))


def test_client_sends_the_counts_once(client, sim, monkeypatch):
    """The chunks' counts go to the cluster once per fit (not once per pass): what the
    tasks of a pass carry is their cells' parameters and the gene parameters."""
    sent = []
    real_submit, real_scatter = client.submit, client.scatter

    def submit(func, *args, **kw):
        sent.append(("submit", len(cloudpickle.dumps(args))))
        return real_submit(func, *args, **kw)

    def scatter(data, **kw):
        sent.append(("scatter", len(cloudpickle.dumps(data))))
        return real_scatter(data, **kw)

    monkeypatch.setattr(client, "submit", submit)
    monkeypatch.setattr(client, "scatter", scatter)
    with parallel_config(client=client):
        _fit(sim.counts)
    counts_bytes = len(pickle.dumps(sim.counts))
    n_chunks = -(-sim.counts.shape[0] // KW["batch_size"])
    task_bytes = [b for kind, b in sent if kind == "submit"]
    # the chunks' data (the first n_chunks tasks): about the counts once, with covariates
    assert sum(task_bytes[:n_chunks]) < 2 * counts_bytes
    # then every pass submits one task per chunk, none carrying counts; 6 iterations of
    # several passes each would send the counts over ten times were they in the tasks
    passes = task_bytes[n_chunks:]
    assert len(passes) > 10 * n_chunks
    assert max(passes) < counts_bytes / 2


def _killer(marker, func):
    """``func``, except that the first call anywhere ends its worker process."""

    def run(*args, **kw):
        if not os.path.exists(marker):
            with open(marker, "w"):
                pass
            os._exit(1)
        return func(*args, **kw)

    return run


def test_worker_killed_mid_run_is_recovered(client, sim, monkeypatch, tmp_path):
    ref = _fit(sim.counts)
    marker = tmp_path / "killed"
    monkeypatch.setattr(chunks_module, "_run_task", _killer(str(marker), chunks_module._run_task))
    with parallel_config(client=client):
        m = _fit(sim.counts)
    assert marker.exists()  # a worker did die
    np.testing.assert_allclose(m.objective_history_, ref.objective_history_, rtol=1e-8)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the next tests


@pytest.fixture(scope="module")
def h5ad(sim, tmp_path_factory):
    anndata = pytest.importorskip("anndata")
    import scipy.sparse as sp  # noqa: PLC0415

    path = tmp_path_factory.mktemp("zinb_dask") / "sim.h5ad"
    anndata.AnnData(sp.csr_matrix(sim.counts, dtype=float)).write_h5ad(path)
    return path


def test_backed_input_is_read_by_the_workers(client, sim, h5ad, monkeypatch):
    """A backed AnnData on a cluster: the chunks' tasks carry the file's reader, not
    counts (each worker reads its chunks from the file), and the fit equals the in-process
    fit of the matrix in memory."""
    anndata = pytest.importorskip("anndata")
    ref = _fit(sim.counts)
    sent = []
    real_submit = client.submit

    def submit(func, *args, **kw):
        sent.append(len(cloudpickle.dumps(args)))
        return real_submit(func, *args, **kw)

    monkeypatch.setattr(client, "submit", submit)
    with parallel_config(client=client):
        m = _fit(anndata.read_h5ad(h5ad, backed="r"))
    np.testing.assert_allclose(m.objective_history_, ref.objective_history_, rtol=1e-8)
    np.testing.assert_allclose(m.W_, ref.W_, rtol=1e-6, atol=1e-8)
    n_chunks = -(-sim.counts.shape[0] // KW["batch_size"])
    counts_bytes = len(pickle.dumps(sim.counts))
    # the chunk tasks: a reader and the chunk's covariates, far less than its counts
    assert max(sent[:n_chunks]) < counts_bytes / n_chunks / 4
