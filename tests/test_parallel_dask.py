"""The Dask engine (issue 15, point 1) on a LocalCluster of 2 worker processes.

One cluster on loopback for the module (started and closed by the fixture). The
distributed results must equal the in-process ones (many-gene PoissonGLMM, from memory
and from a backed .h5ad file; resampling_test; GLMEIV); a worker killed in the middle
of a run must not change the result; what the client sends (scatter and submit
arguments) must stay far below the size of the count matrix when the data are on disk.
"""

import os
import pickle
import shutil
import subprocess
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

distributed = pytest.importorskip("distributed")
anndata = pytest.importorskip("anndata")
cloudpickle = pytest.importorskip("cloudpickle")

import skmixed.mixed._gene_chunks as gene_chunks  # noqa: E402
import skmixed.mixed._multigene as multigene  # noqa: E402
from skmixed import PoissonGLMM  # noqa: E402
from skmixed._parallel import Engine, local_cluster, map_chunks, parallel_config  # noqa: E402
from skmixed.cli import main  # noqa: E402
from skmixed.datasets import make_boland_like_counts, make_zinb_counts  # noqa: E402
from skmixed.eiv import GLMEIV, make_glmeiv_data  # noqa: E402
from skmixed.offset import make_perturbation_screen, resampling_test  # noqa: E402

pytestmark = pytest.mark.slow  # the cluster takes several seconds to start on a loaded machine

FORMULA = "~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"


@pytest.fixture(scope="module")
def client():
    with local_cluster(2, host="127.0.0.1", worker_dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        assert c.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")) == dict.fromkeys(c.scheduler_info()["workers"])
        yield c


def _fit(data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PoissonGLMM.from_formula(FORMULA, data, **kw)


def _same(m, ref):
    for attr in ("coef_", "coef_se_", "theta_", "loglik_", "loglik_saturated_"):
        np.testing.assert_allclose(getattr(m, attr), getattr(ref, attr), rtol=1e-10, atol=1e-12, err_msg=attr)
    assert list(m.flags_) == list(ref.flags_)
    pd.testing.assert_frame_equal(m.genes_, ref.genes_, rtol=1e-10)


@pytest.fixture(scope="module")
def boland(tmp_path_factory):
    cells, counts, truth = make_boland_like_counts(n_genes=24, n_cells=1500, random_state=4)
    cells.index = cells.index.astype(str)
    adata = anndata.AnnData(sp.csc_matrix(counts, dtype=float), obs=cells, var=pd.DataFrame(index=truth.gene.to_numpy()))
    path = tmp_path_factory.mktemp("dask") / "boland.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_map_chunks_on_the_cluster(client):
    data = np.arange(100.0)
    got = map_chunks(lambda sl, a: float(a[sl].sum()), [slice(0, 10), slice(10, 60), slice(60, 100)],
                     shared=(data,), client=client)
    assert got == [45.0, float(data[10:60].sum()), float(data[60:].sum())]
    with Engine(client=client) as eng:
        assert eng.distributed and eng.workers == 2
    with parallel_config(client=client):
        assert Engine().distributed and not Engine(client=False).distributed
    with pytest.raises(ValueError, match="client must be a dask.distributed.Client"):
        Engine(client="tcp://127.0.0.1:8786")


def test_many_gene_fit_distributed_equals_in_process(client, boland, monkeypatch):
    adata, path = boland
    monkeypatch.setattr(multigene, "CHUNK_GENES", 5)  # several chunks: 24 genes in 5 tasks
    ref = _fit(adata)
    with parallel_config(client=client):
        from_memory = _fit(adata)
        from_file = _fit(anndata.read_h5ad(path, backed="r"))
    _same(from_memory, ref)
    _same(from_file, ref)


def test_client_sends_paths_not_the_matrix(client, monkeypatch, tmp_path):
    """With a backed file, what the client sends (scattered objects and task arguments)
    is a small fraction of the matrix: the workers open the file and read their genes.
    The client sends per-cell arrays (the design, the offset) and small per-gene
    statistics (cells + genes), never the counts (cells x genes)."""
    cells, counts, truth = make_boland_like_counts(n_genes=300, n_cells=20_000, random_state=7)
    cells.index = cells.index.astype(str)
    adata = anndata.AnnData(sp.csc_matrix(counts, dtype=float), obs=cells, var=pd.DataFrame(index=truth.gene.to_numpy()))
    path = tmp_path / "boland300.h5ad"
    adata.write_h5ad(path)
    monkeypatch.setattr(multigene, "CHUNK_GENES", 50)
    sent = []
    scatter, submit = client.scatter, client.submit

    def spy_scatter(data, **kw):
        sent.append(len(cloudpickle.dumps(data)))
        return scatter(data, **kw)

    def spy_submit(func, *args, **kw):
        sent.append(len(cloudpickle.dumps((func, args))))
        return submit(func, *args, **kw)

    monkeypatch.setattr(client, "scatter", spy_scatter)
    monkeypatch.setattr(client, "submit", spy_submit)
    with parallel_config(client=client):
        m = _fit(anndata.read_h5ad(path, backed="r"))
    matrix_bytes = len(pickle.dumps(adata.X))  # CSC: about 12 bytes per non-zero count
    assert sum(sent) < matrix_bytes / 5, (sorted(sent)[-5:], len(sent), matrix_bytes)
    # and nothing of the size of one chunk of the matrix in any single message
    assert max(sent) < matrix_bytes / 10
    _same(m, _fit(adata))


def _killer(marker, func):
    """``func``, except that the first call anywhere ends its worker process."""

    def run(*args):
        if not os.path.exists(marker):
            with open(marker, "w"):
                pass
            os._exit(1)
        return func(*args)

    return run


@pytest.mark.parametrize("source", ["backed", "memory"])
def test_worker_killed_mid_run_is_recovered(client, boland, monkeypatch, tmp_path, source):
    """The first task to run kills its worker; Dask reruns the lost task on the other
    worker (the shared data were broadcast, the in-memory blocks sent to two workers,
    so a copy survives) and the fit completes with the in-process numbers."""
    adata, path = boland
    monkeypatch.setattr(multigene, "CHUNK_GENES", 5)
    ref = _fit(adata)
    marker = tmp_path / "killed"
    monkeypatch.setattr(gene_chunks, "_reduce_chunk", _killer(str(marker), gene_chunks._reduce_chunk))
    with parallel_config(client=client):
        m = _fit(anndata.read_h5ad(path, backed="r") if source == "backed" else adata)
    assert marker.exists()  # a worker did die
    _same(m, ref)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the next tests


def test_resampling_test_distributed_equals_in_process(client):
    counts, treatment, covariates, _ = make_perturbation_screen(1500, 24, 10, random_state=5)
    # few pairs per perturbation: packed conditional blocks (common random numbers) too
    pairs = [(f"gene{g}", f"pert{p}") for p in range(10) for g in (p, p + 3, p + 7)]
    for resampling in ("conditional", "permutation"):
        kw = dict(pairs=pairs, n_resamples=99, resampling=resampling, random_state=0, return_resampled=True)
        ref, ref_draws = resampling_test(counts, treatment, covariates, **kw)
        with parallel_config(client=client):
            res, draws = resampling_test(counts, treatment, covariates, **kw)
        pd.testing.assert_frame_equal(res, ref, rtol=1e-10)
        np.testing.assert_allclose(draws, ref_draws, rtol=1e-10)


def test_glmeiv_distributed_equals_in_process(client):
    covariates, mrna, grna, offsets, _ = make_glmeiv_data(20_000, 12, pi=0.05, random_state=6)
    kw = dict(grna=grna, offset=offsets["mrna"].to_numpy(), grna_offset=offsets["grna"].to_numpy(),
              pairs=[(j, j) for j in range(12)])  # 6 pairs per block: 2 tasks
    ref = GLMEIV(n_restarts=3, random_state=0).fit(covariates, mrna, **kw).pairs_
    with parallel_config(client=client):
        got = GLMEIV(n_restarts=3, random_state=0).fit(covariates, mrna, **kw).pairs_
    pd.testing.assert_frame_equal(got, ref, rtol=1e-10)


# ------------------------------------------------------------------ command line
CONTRAST = "UC = T : R : diseased - T : R : healthy"


def _script(*args, cwd):
    exe = shutil.which("skmixed")
    if exe is None:
        pytest.fail("the 'skmixed' console script is not on PATH; pip install . (or -e .) first")
    return subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_de_on_a_scheduler_address_equals_in_process(client, boland):
    """The installed script with --scheduler tcp://... (this module's cluster) and
    --backed: the workers read the file; the table is the in-process one."""
    _, path = boland
    d = path.parent
    r0 = _script("de", path.name, "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de0.csv", "-q", cwd=d)
    r1 = _script("de", path.name, "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de1.csv", "-q",
                 "--backed", "--scheduler", client.scheduler.address, cwd=d)
    assert r0.returncode == 0, r0.stderr
    assert r1.returncode == 0, r1.stderr
    pd.testing.assert_frame_equal(pd.read_csv(d / "de1.csv"), pd.read_csv(d / "de0.csv"), rtol=1e-10)


def test_cli_screen_with_a_local_cluster(tmp_path):
    """--scheduler local starts (and closes) a LocalCluster of worker processes."""
    counts, treatment, covariates, _ = make_perturbation_screen(600, 6, 3, random_state=8)
    names = [f"cell{i}" for i in range(600)]
    adata = anndata.AnnData(counts.to_numpy(dtype=float), obs=covariates.set_axis(names).join(
        treatment.set_axis(names).astype(int)), var=pd.DataFrame(index=counts.columns))
    adata.write_h5ad(tmp_path / "screen.h5ad")
    common = ["screen", "screen.h5ad", "--treatment-obs", *treatment.columns, "--covariates", *covariates.columns,
              "--n-resamples", "49", "-q"]
    r0 = _script(*common, "--out", "r0.csv", cwd=tmp_path)
    r1 = _script(*common, "--out", "r1.csv", "--scheduler", "local", "--backed", cwd=tmp_path)
    assert r0.returncode == 0, r0.stderr
    assert r1.returncode == 0, r1.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "r1.csv"), pd.read_csv(tmp_path / "r0.csv"), rtol=1e-10)


def test_cli_scheduler_bad_arguments(boland, capsys):
    _, path = boland
    base = ["de", str(path), "--formula", FORMULA, "--contrast", CONTRAST, "--out", str(path.parent / "x.csv")]
    assert main([*base, "--scheduler", "my-cluster"]) == 2
    assert "--scheduler must be 'local' or an address such as tcp://host:8786, got 'my-cluster'" in capsys.readouterr().err


def test_cli_zinbwave_on_a_scheduler_address(client, tmp_path):
    """skmixed zinbwave --scheduler: ZINBWaVE's passes over the cells run on the cluster
    (its own tests compare the objective paths); the command's W is the in-process one."""
    sim = make_zinb_counts(150, 30, random_state=9)
    adata = anndata.AnnData(sim.counts, obs=sim.cells.set_axis([f"cell{i}" for i in range(150)]))
    adata.write_h5ad(tmp_path / "zinb.h5ad")
    common = ["zinbwave", "zinb.h5ad", "-k", "2", "--max-iter", "5", "-q"]
    r0 = _script(*common, "--out", "z0.h5ad", "--csv", "W0.csv", cwd=tmp_path)
    r1 = _script(*common, "--out", "z1.h5ad", "--csv", "W1.csv", "--scheduler", client.scheduler.address, "-vv",
                 cwd=tmp_path)
    assert r0.returncode == 0, r0.stderr
    assert r1.returncode == 0, r1.stderr
    assert f"chunks on the Dask cluster at {client.scheduler.address}" in r1.stderr  # the debug log
    np.testing.assert_allclose(pd.read_csv(tmp_path / "W1.csv", index_col=0), pd.read_csv(tmp_path / "W0.csv", index_col=0),
                               rtol=1e-6, atol=1e-8)
