"""Counts read from disk by chunks (issue 15, point 2): backed AnnData and dask arrays.

The many-gene PoissonGLMM and ``resampling_test`` given ``anndata.read_h5ad(path,
backed="r")`` (or a ``dask.array``) read the file by chunks of genes and must give the
in-memory results exactly; the chunks read are bounded by the chunk size; chunk size
and ``n_jobs`` change nothing; bad values in the file are reported with where they
were read. The Dask-cluster versions are in test_parallel_dask.py.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

anndata = pytest.importorskip("anndata")

import skmixed.mixed._multigene as multigene  # noqa: E402
from skmixed import PoissonGLMM  # noqa: E402
from skmixed._inputs import MatrixReader, count_source  # noqa: E402
from skmixed._parallel import parallel_config  # noqa: E402
from skmixed.datasets import make_boland_like_counts  # noqa: E402
from skmixed.offset import make_perturbation_screen, resampling_test  # noqa: E402

FORMULA = "~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"


def _dense(M):
    return M.toarray() if sp.issparse(M) else np.asarray(M)


@pytest.fixture(scope="module")
def boland(tmp_path_factory):
    """A 2,000-cell, 25-gene Boland-like data set in memory and as CSC, CSR and dense .h5ad files."""
    d = tmp_path_factory.mktemp("backed")
    cells, counts, truth = make_boland_like_counts(n_genes=25, n_cells=2000, random_state=1)
    cells.index = cells.index.astype(str)
    adata = anndata.AnnData(sp.csc_matrix(counts, dtype=float), obs=cells, var=pd.DataFrame(index=truth.gene.to_numpy()))
    paths = {}
    for fmt in ("csc", "csr", "dense"):
        a = adata.copy()
        a.X = a.X.toarray() if fmt == "dense" else a.X.asformat(fmt)
        a.layers["raw"] = a.X.copy()
        paths[fmt] = d / f"boland_{fmt}.h5ad"
        a.write_h5ad(paths[fmt])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PoissonGLMM.from_formula(FORMULA, adata)
    return adata, paths, ref


def _same_fit(m, ref, rtol=1e-10):
    assert list(m.gene_names_) == list(ref.gene_names_)
    for attr in ("coef_", "coef_se_", "theta_", "loglik_", "loglik_saturated_"):
        np.testing.assert_allclose(getattr(m, attr), getattr(ref, attr), rtol=rtol, atol=1e-12, err_msg=attr)
    assert list(m.flags_) == list(ref.flags_)
    pd.testing.assert_frame_equal(m.genes_, ref.genes_, rtol=rtol)


def _close_fit(m, ref):
    """Another chunking of the genes: the genes are fitted batch by batch, so the genes
    fitted cleanly agree to the optimiser's tolerance (not to the last digit); a gene
    flagged 'zero_count_group' has a -inf MLE, reported where the optimiser stopped."""
    assert list(m.flags_) == list(ref.flags_)
    ok = np.asarray(ref.flags_) == ""
    assert ok.sum() >= 10
    np.testing.assert_allclose(m.coef_[ok], ref.coef_[ok], rtol=1e-7)
    np.testing.assert_allclose(m.theta_[ok], ref.theta_[ok], rtol=1e-6)
    np.testing.assert_allclose(m.loglik_[ok], ref.loglik_[ok], rtol=1e-12)
    np.testing.assert_allclose(m.loglik_saturated_, ref.loglik_saturated_, rtol=1e-12)


def _fit(data, chunk=None, n_jobs=None):
    old = multigene.CHUNK_GENES
    multigene.CHUNK_GENES = chunk or old  # not monkeypatch: hypothesis reuses function-scoped fixtures
    try:
        with warnings.catch_warnings(), parallel_config(n_jobs=n_jobs):
            warnings.simplefilter("ignore")
            return PoissonGLMM.from_formula(FORMULA, data)
    finally:
        multigene.CHUNK_GENES = old


@pytest.mark.parametrize("fmt", ["csc", "csr", "dense"])
@pytest.mark.parametrize("layer", [None, "raw"])
def test_reader_blocks_equal_the_matrix(boland, fmt, layer):
    adata, paths, _ = boland
    backed = anndata.read_h5ad(paths[fmt], backed="r")
    src = count_source(backed, layer=layer, arg="adata", stream=True)
    reader = src.values
    assert isinstance(reader, MatrixReader) and reader.kind == "h5ad"
    assert reader.key == ("X" if layer is None else "layers/raw") and reader.where.startswith("adata.")
    assert reader.shape == adata.shape and list(src.names) == list(adata.var_names)
    X = adata.X.toarray()
    np.testing.assert_array_equal(_dense(reader.columns(slice(3, 11))), X[:, 3:11])
    np.testing.assert_array_equal(_dense(reader.columns(np.array([20, 2, 2, 7]))), X[:, [20, 2, 2, 7]])
    np.testing.assert_array_equal(_dense(reader.rows(slice(100, 350))), X[100:350])
    np.testing.assert_array_equal(_dense(reader.rows(np.array([1500, 3]))), X[[1500, 3]])
    # without stream=True the same AnnData is read into memory, as before
    assert not isinstance(count_source(backed, layer=layer).values, MatrixReader)


def test_reader_of_a_dask_array():
    da = pytest.importorskip("dask.array")
    X = np.arange(60.0).reshape(6, 10)
    src = count_source(da.from_array(X, chunks=(4, 3)), stream=True)
    assert src.values.kind == "dask" and src.names is None
    np.testing.assert_array_equal(src.values.columns(slice(2, 7)), X[:, 2:7])
    np.testing.assert_array_equal(src.values.rows(np.array([5, 0])), X[[5, 0]])


@pytest.mark.parametrize("fmt", ["csc", "csr", "dense"])
def test_many_gene_fit_from_backed_equals_in_memory(boland, fmt):
    _, paths, ref = boland
    backed = anndata.read_h5ad(paths[fmt], backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = PoissonGLMM.from_formula(FORMULA, backed)
        m_layer = PoissonGLMM.from_formula(FORMULA, backed, layer="raw")
    _same_fit(m, ref)
    _same_fit(m_layer, ref)
    C = {"UC": {"cell_groupT : R : diseased": 1.0, "cell_groupT : R : healthy": -1.0}}
    pd.testing.assert_frame_equal(m.contrast(C), ref.contrast(C), rtol=1e-10)


def test_fit_with_dask_array_counts_equals_numpy(boland):
    da = pytest.importorskip("dask.array")
    adata, _, _ = boland
    cells = adata.obs
    X = pd.get_dummies(cells.cell_group, dtype=float)
    Y = adata.X.toarray()
    kw = dict(groups=cells.patient_assignment.to_numpy(), offset=np.log(cells.total_count.to_numpy()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PoissonGLMM(fit_intercept=False).fit(X, Y, **kw)
        m = PoissonGLMM(fit_intercept=False).fit(X, da.from_array(Y, chunks=(500, 7)), **kw)
    _same_fit(m, ref)


def test_backed_fit_reads_bounded_chunks(boland, monkeypatch):
    """Every read is one chunk of genes (CHUNK_GENES at most), each gene read once:
    peak memory follows the chunk size, not the number of genes."""
    adata, paths, ref = boland
    monkeypatch.setattr(multigene, "CHUNK_GENES", 4)
    reads = []
    original = MatrixReader.columns

    def spy(self, sel):
        block = original(self, sel)
        reads.append((sel, block.shape))
        return block

    monkeypatch.setattr(MatrixReader, "columns", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = PoissonGLMM.from_formula(FORMULA, anndata.read_h5ad(paths["csc"], backed="r"))
    assert [s for s, _ in reads] == [slice(s, min(s + 4, 25)) for s in range(0, 25, 4)]
    assert all(shape[0] == 2000 and shape[1] <= 4 for _, shape in reads)
    monkeypatch.setattr(MatrixReader, "columns", original)
    _same_fit(m, _fit(adata, chunk=4))  # the same chunks in memory: the same numbers
    _close_fit(m, ref)


@settings(max_examples=8, deadline=None)
@given(chunk=st.integers(1, 30), n_jobs=st.sampled_from([1, 2, -1]))
def test_chunk_size_and_n_jobs(boland, chunk, n_jobs):
    """n_jobs (threads) changes nothing at all; the chunk size nothing beyond the
    optimiser's tolerance (see _close_fit)."""
    adata, paths, ref = boland
    m = _fit(anndata.read_h5ad(paths["csc"], backed="r"), chunk=chunk, n_jobs=n_jobs)
    _same_fit(m, _fit(adata, chunk=chunk, n_jobs=1), rtol=0)
    _close_fit(m, ref)


def test_bad_values_in_the_file_name_where_they_were_read(tmp_path):
    cells, counts, _ = make_boland_like_counts(n_genes=6, n_cells=400, random_state=2)
    cells.index = cells.index.astype(str)
    X = sp.csc_matrix(counts, dtype=float)
    bad = X.copy()
    bad.data[5] = -1.0
    anndata.AnnData(bad, obs=cells).write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(ValueError, match=r"data\.X must be non-negative counts"):
        PoissonGLMM.from_formula(FORMULA, anndata.read_h5ad(tmp_path / "neg.h5ad", backed="r"))
    frac = X.copy()
    frac.data = frac.data + 0.5
    anndata.AnnData(frac, obs=cells).write_h5ad(tmp_path / "frac.h5ad")
    with pytest.raises(ValueError, match=r"data\.X holds non-integer values"):
        PoissonGLMM.from_formula(FORMULA, anndata.read_h5ad(tmp_path / "frac.h5ad", backed="r"))


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    Y, treatment, covariates, _ = make_perturbation_screen(1500, 20, 6, random_state=3)
    names = [f"cell{i}" for i in range(1500)]
    adata = anndata.AnnData(sp.csc_matrix(Y.to_numpy(dtype=float)), obs=covariates.set_axis(names),
                            var=pd.DataFrame(index=Y.columns))
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    adata.write_h5ad(path)
    return Y, treatment, covariates, path


def test_resampling_test_from_backed_reads_only_the_genes_in_pairs(screen, monkeypatch):
    Y, treatment, covariates, path = screen
    pairs = [(f"gene{g}", f"pert{p}") for p in range(6) for g in (4, 11, 2)]
    kw = dict(pairs=pairs, n_resamples=99, random_state=0, return_resampled=True)
    ref, ref_draws = resampling_test(Y, treatment, covariates, **kw)
    reads = []
    original = MatrixReader.columns

    def spy(self, sel):
        reads.append(np.asarray(sel))
        return original(self, sel)

    monkeypatch.setattr(MatrixReader, "columns", spy)
    backed = anndata.read_h5ad(path, backed="r")
    res, draws = resampling_test(backed, treatment, covariates, **kw)
    assert len(reads) == 1 and list(reads[0]) == [2, 4, 11]
    pd.testing.assert_frame_equal(res, ref)
    np.testing.assert_array_equal(draws, ref_draws)


# ------------------------------------------------------------------ ZINBWaVE by chunks of cells
import skmixed.zinb._estimator as zinb_estimator  # noqa: E402
from skmixed import ZINBWaVE  # noqa: E402
from skmixed.datasets import make_zinb_counts  # noqa: E402
from skmixed.zinb._schedule import prefit_dispersion  # noqa: E402

ZKW = {"n_components": 2, "random_state": 0, "max_iter": 4, "tol": 0.0, "batch_size": 70}


@pytest.fixture(scope="module")
def zinb(tmp_path_factory):
    """350 cells x 60 genes of ZINB counts in memory and as CSR, CSC and dense .h5ad files
    (the CSR file also with the counts in a layer under a normalised .X)."""
    d = tmp_path_factory.mktemp("zinb")
    sim = make_zinb_counts(350, 60, n_clusters=3, random_state=5)
    Y = sp.csr_matrix(sim.counts, dtype=float)
    var = pd.DataFrame(index=[f"g{j}" for j in range(Y.shape[1])])
    obs = pd.DataFrame(index=[f"c{i}" for i in range(Y.shape[0])])
    paths = {}
    for fmt in ("csr", "csc", "dense"):
        X = Y.toarray() if fmt == "dense" else Y.asformat(fmt)
        paths[fmt] = d / f"zinb_{fmt}.h5ad"
        anndata.AnnData(X, obs=obs, var=var).write_h5ad(paths[fmt])
    layered = anndata.AnnData(sp.csr_matrix(np.log1p(Y.toarray())), obs=obs, var=var)
    layered.layers["counts"] = Y
    paths["layer"] = d / "zinb_layer.h5ad"
    layered.write_h5ad(paths["layer"])
    return Y, paths


def _zfit(Y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter is reached on purpose
        return ZINBWaVE(**{**ZKW, **kw}).fit(Y)


def _same_zinb(m, ref, rtol=1e-8):
    np.testing.assert_allclose(m.objective_history_, ref.objective_history_, rtol=rtol)
    for attr in ("W_", "alpha_mu_", "beta_mu_", "gamma_pi_", "zeta_"):
        np.testing.assert_allclose(getattr(m, attr), getattr(ref, attr), rtol=1e-6, atol=1e-9, err_msg=attr)


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "layer"])
def test_zinbwave_from_backed_equals_in_memory(zinb, fmt):
    Y, paths = zinb
    ref = _zfit(Y)
    m = _zfit(anndata.read_h5ad(paths[fmt], backed="r"))
    _same_zinb(m, ref)
    assert list(m.feature_names_in_) == [f"g{j}" for j in range(Y.shape[1])]


def test_zinbwave_from_dask_array_equals_in_memory(zinb):
    da = pytest.importorskip("dask.array")
    Y, _ = zinb
    ref = _zfit(Y, common_dispersion=False)
    _same_zinb(_zfit(da.from_array(Y.toarray(), chunks=(100, 60)), common_dispersion=False), ref)
    _same_zinb(_zfit(da.from_array(Y, chunks=(64, 60)), common_dispersion=False), ref)


def test_zinbwave_backed_reads_chunks_of_cells_only(zinb, monkeypatch):
    """Every read of the file is a chunk of at most batch_size cells (or the dispersion
    pre-fit's subsample, here 150 cells), never the whole matrix: no read of all the
    cells, no column read, no AnnData to_memory, each chunk read once per pass."""
    Y, paths = zinb
    monkeypatch.setattr(zinb_estimator, "prefit_dispersion",
                        lambda *a, **kw: prefit_dispersion(*a, **{**kw, "size": 150}))
    ref = _zfit(Y)
    reads = []
    original = MatrixReader.rows

    def rows(self, sel):
        block = original(self, sel)
        reads.append(block.shape[0])
        return block

    def never(*args, **kw):
        raise AssertionError("the whole matrix was read")

    monkeypatch.setattr(MatrixReader, "rows", rows)
    monkeypatch.setattr(MatrixReader, "columns", never)
    monkeypatch.setattr("skmixed._inputs._in_memory", never)
    backed = anndata.read_h5ad(paths["csr"], backed="r")
    monkeypatch.setattr(type(backed.X), "to_memory", never, raising=False)
    m = _zfit(backed)
    _same_zinb(m, ref)
    assert max(reads) <= 150 and reads.count(150) == 1  # the subsample, once
    chunk_reads = [r for r in reads if r != 150]
    assert set(chunk_reads) == {70} and len(chunk_reads) % 5 == 0  # 350 cells = 5 chunks per pass
    assert len(chunk_reads) // 5 > 20  # the check, the initialisation's and the iterations' passes


def test_zinbwave_transform_and_obsm_of_backed(zinb, tmp_path):
    Y, paths = zinb
    ref = _zfit(Y)
    backed = anndata.read_h5ad(paths["csr"], backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = ZINBWaVE(**ZKW).fit_transform(backed, key_added="X_zinbwave")
    np.testing.assert_allclose(backed.obsm["X_zinbwave"], ref.W_, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(W, backed.obsm["X_zinbwave"])
    m = _zfit(backed)
    np.testing.assert_array_equal(m.transform(backed), m.W_)  # the training cells, recognised on disk
    # new cells: fitted with the genes fixed, from disk as from memory
    new = Y[:120]
    anndata.AnnData(new, var=pd.DataFrame(index=[f"g{j}" for j in range(Y.shape[1])])).write_h5ad(tmp_path / "new.h5ad")
    np.testing.assert_allclose(m.transform(anndata.read_h5ad(tmp_path / "new.h5ad", backed="r")),
                               m.transform(anndata.AnnData(new, var=backed.var)), rtol=1e-8, atol=1e-10)


def _spy_results(monkeypatch, method, pick):
    """Wrap ``ChunkWork.<method>``: before each call, count the results of earlier calls
    still alive (weak references to ``pick(result)``). Returns the list of counts."""
    import weakref  # noqa: PLC0415

    from skmixed.zinb._chunks import ChunkWork  # noqa: PLC0415

    original = getattr(ChunkWork, method)
    refs, alive = [], []

    def spy(self, *args, **kw):
        alive.append(sum(r() is not None for r in refs))
        out = original(self, *args, **kw)
        refs.append(weakref.ref(pick(out)))
        return out

    monkeypatch.setattr(ChunkWork, method, spy)
    return alive


@pytest.mark.parametrize("source", ["memory", "backed"])
def test_zinbwave_passes_hold_one_chunk_result_at_a_time(zinb, monkeypatch, source):
    """A pass over the chunks of cells consumes each chunk's result before computing the
    next: the per-gene sums of the cell pass, the trial pass and the likelihood passes,
    and the corrections of the moved genes, are never a list over every chunk (at
    200,000 cells x 1,000 genes, K = 10, such lists cost 0.1-0.25 GiB each)."""
    Y, paths = zinb
    counts = {
        "cell_pass": _spy_results(monkeypatch, "cell_pass", lambda r: r[1]["ll"]),
        "trial": _spy_results(monkeypatch, "trial", lambda r: r[0]),
        "loglik": _spy_results(monkeypatch, "loglik", lambda r: r),
        "moved": _spy_results(monkeypatch, "moved", lambda r: r[0]),
    }
    data = Y if source == "memory" else anndata.read_h5ad(paths["csr"], backed="r")
    m = _zfit(data, n_components=4, batch_size=50)  # 7 chunks; some genes' steps are halved
    assert m.n_iter_ == ZKW["max_iter"]
    for method, alive in counts.items():
        # the previous chunk's result may still be bound in the consumer's loop
        assert len(alive) >= 7 and max(alive) <= 1, (method, max(alive))


def test_zinbwave_streamed_without_kept_cell_statistics_equals_in_memory(zinb, monkeypatch):
    """A streamed fit whose cells' Newton statistics would outgrow one chunk's
    evaluation recomputes them in each cell pass instead of keeping them (memory bounded
    by the chunk and the parameters): the same fit as in memory, to rounding."""
    from skmixed.zinb import _optimize  # noqa: PLC0415
    from skmixed.zinb._stream import StreamedCounts  # noqa: PLC0415

    Y, paths = zinb
    ref = _zfit(Y, common_dispersion=False)
    streamed = StreamedCounts(MatrixReader.from_array(Y), batch_size=70)
    assert _optimize.keep_cell_stats(streamed, 2 + 2) and _optimize.keep_cell_stats(Y, 2 + 2)
    monkeypatch.setattr(_optimize, "STATS_PER_CHUNK_ENTRY", 0)
    assert not _optimize.keep_cell_stats(streamed, 2 + 2)
    kept = []
    original = _optimize.Optimizer.gene_step

    def gene_step(self, P, acc):
        out = original(self, P, acc)
        kept.append(self._cache is not None)
        return out

    monkeypatch.setattr(_optimize.Optimizer, "gene_step", gene_step)
    trials = _spy_results(monkeypatch, "trial", lambda r: r[0])
    m = _zfit(anndata.read_h5ad(paths["csr"], backed="r"), common_dispersion=False)
    _same_zinb(m, ref)
    assert kept and not any(kept) and not trials  # likelihood passes in place of trial passes


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(40, 400), common=st.booleans())
def test_zinbwave_backed_equals_in_memory_for_any_chunk_size(zinb, batch, common):
    Y, paths = zinb
    ref = _zfit(Y, batch_size=batch, common_dispersion=common)
    _same_zinb(_zfit(anndata.read_h5ad(paths["csr"], backed="r"), batch_size=batch, common_dispersion=common), ref)


@pytest.mark.parametrize("case, message", [
    ("negative", r"Negative values in data passed to ZINBWaVE"),
    ("nan", r"Y contains NaN or infinity \(read from Y\.X\)"),
    ("fraction", r"Y\.X holds non-integer values"),
    ("empty_cell", r"1 cell\(s\) with only zero counts \(first: row 3\)"),
    ("empty_gene", r"1 gene\(s\) with only zero counts \(first: column 'g5'\)"),
])
def test_zinbwave_backed_bad_values_are_reported(zinb, tmp_path, case, message):
    Y, _ = zinb
    X = Y.toarray()
    if case == "negative":
        X[200, 4] = -1.0
    elif case == "nan":
        X[300, 7] = np.nan
    elif case == "fraction":
        X[10, 1] = 2.5
    elif case == "empty_cell":
        X[3] = 0.0
    else:
        X[:, 5] = 0.0
    var = pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])])
    anndata.AnnData(sp.csr_matrix(X), var=var).write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match=message):
        ZINBWaVE(**ZKW).fit(anndata.read_h5ad(tmp_path / "bad.h5ad", backed="r"))


# ------------------------------------------------------------------ GLMEIV reads the columns in pairs
from skmixed.eiv import GLMEIV, make_glmeiv_data  # noqa: E402

EIV_PAIRS = [("gene2", "grna2"), ("gene5", "grna5"), ("gene2", "grna5"), ("gene6", "grna2")]


@pytest.fixture(scope="module")
def eiv(tmp_path_factory):
    """6,000 cells, 8 genes and 8 gRNAs in memory and as .h5ad files (mRNA CSC, gRNA
    CSR: a minor-axis read too)."""
    d = tmp_path_factory.mktemp("eiv")
    covariates, mrna, grna, offsets, _ = make_glmeiv_data(6000, 8, pi=0.05, random_state=8)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(6000)])
    genes = [f"gene{j}" for j in range(8)]
    grnas = [f"grna{j}" for j in range(8)]
    anndata.AnnData(sp.csc_matrix(mrna, dtype=float), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(d / "m.h5ad")
    anndata.AnnData(sp.csr_matrix(grna, dtype=float), obs=obs, var=pd.DataFrame(index=grnas)).write_h5ad(d / "g.h5ad")
    data = dict(X=covariates, y=pd.DataFrame(mrna, columns=genes), grna=pd.DataFrame(grna, columns=grnas),
                offset=offsets["mrna"].to_numpy(), grna_offset=offsets["grna"].to_numpy())
    return data, d / "m.h5ad", d / "g.h5ad"


def _eiv_fit(data, y, grna, pairs=EIV_PAIRS):
    kw = {k: data[k] for k in ("offset", "grna_offset")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GLMEIV(n_restarts=3, random_state=0).fit(data["X"], y, grna=grna, pairs=pairs, **kw)


def _same_eiv(m, ref):
    pd.testing.assert_frame_equal(m.pairs_, ref.pairs_, rtol=1e-10)
    pd.testing.assert_frame_equal(m.results_, ref.results_, rtol=1e-10)


def test_glmeiv_from_backed_reads_only_the_columns_in_pairs(eiv, monkeypatch):
    data, mpath, gpath = eiv
    ref = _eiv_fit(data, data["y"], data["grna"])
    reads = []
    original = MatrixReader.columns

    def columns(self, sel):
        reads.append((self.where, sorted(set(np.atleast_1d(np.arange(self.shape[1])[sel]).tolist()))))
        return original(self, sel)

    def never(*args, **kw):
        raise AssertionError("the whole matrix was read")

    monkeypatch.setattr(MatrixReader, "columns", columns)
    monkeypatch.setattr(MatrixReader, "rows", never)
    monkeypatch.setattr("skmixed._inputs._in_memory", never)
    m = _eiv_fit(data, anndata.read_h5ad(mpath, backed="r"), anndata.read_h5ad(gpath, backed="r"))
    _same_eiv(m, ref)
    assert {w for w, _ in reads} == {"y.X", "grna.X"}
    assert all(set(cols) <= ({2, 5, 6} if w == "y.X" else {2, 5}) for w, cols in reads)
    # the blocks of pairs read their own columns (here one block: the four pairs' columns)
    assert ("y.X", [2, 5, 6]) in reads and ("grna.X", [2, 5]) in reads


def test_glmeiv_pilot_reads_a_block_of_columns_at_a_time(eiv, monkeypatch):
    """The zero checks and the pilot fits read y and grna a block of columns at a time
    (here 2 columns: read budgets of 2 x 6,000 elements, pilot blocks of 1 column), never
    every gene in pairs at once; the pilot's linear predictors are not kept (n, genes)
    but recomputed per block of pairs. The fit equals the in-memory fit with the default
    blocks to 1e-10."""
    import skmixed.eiv._estimator as eiv_estimator  # noqa: PLC0415
    import skmixed.eiv._init as eiv_init  # noqa: PLC0415

    data, mpath, gpath = eiv
    pairs = EIV_PAIRS + [("gene0", "grna2"), ("gene1", "grna5"), ("gene7", "grna6"), ("gene4", "grna6")]
    ref = _eiv_fit(data, data["y"], data["grna"], pairs)
    monkeypatch.setattr(eiv_init, "_PILOT_ELEMENTS", 6000)
    monkeypatch.setattr(eiv_estimator, "_READ_ELEMENTS", 2 * 6000)
    monkeypatch.setattr(eiv_estimator, "_BLOCK_ELEMENTS", 2 * 6000)  # blocks of 2 pairs
    reads, pilots = [], []
    original = MatrixReader.columns

    def columns(self, sel):
        reads.append((self.where, len(np.arange(self.shape[1])[sel])))
        return original(self, sel)

    original_pilot = eiv_estimator.fit_pilot

    def fit_pilot(Z, Y, *args, **kw):
        pilots.append(Y.shape[1])
        return original_pilot(Z, Y, *args, **kw)

    monkeypatch.setattr(MatrixReader, "columns", columns)
    monkeypatch.setattr(eiv_estimator, "fit_pilot", fit_pilot)
    m = _eiv_fit(data, anndata.read_h5ad(mpath, backed="r"), anndata.read_h5ad(gpath, backed="r"), pairs)
    _same_eiv(m, ref)
    assert max(n for _, n in reads) == 2 and max(pilots) == 2
    # 7 genes and 3 gRNAs in pairs: 4 + 2 blocks for the zero checks, again for the pilots
    assert [n for w, n in reads if w == "y.X"][:8] == [2, 2, 2, 1, 2, 2, 2, 1]
    assert [n for w, n in reads if w == "grna.X"][:4] == [2, 1, 2, 1]
    in_memory = _eiv_fit(data, data["y"], data["grna"], pairs)  # the same blocks in memory
    pd.testing.assert_frame_equal(in_memory.results_, m.results_)


def test_glmeiv_from_dask_arrays_equals_in_memory(eiv):
    da = pytest.importorskip("dask.array")
    data, _, _ = eiv
    pairs = [(int(g[4:]), int(p[4:])) for g, p in EIV_PAIRS]  # unnamed columns: positions
    ref = _eiv_fit(data, data["y"].to_numpy(), data["grna"].to_numpy(), pairs)
    m = _eiv_fit(data, da.from_array(data["y"].to_numpy(), chunks=(1000, 3)),
                 da.from_array(data["grna"].to_numpy(), chunks=(2500, 8)), pairs)
    _same_eiv(m, ref)


def test_glmeiv_backed_bad_values_name_where_they_were_read(eiv, tmp_path):
    data, _, gpath = eiv
    Y = data["y"].to_numpy(dtype=float)
    Y[10, 5] = 1.5
    anndata.AnnData(sp.csc_matrix(Y), var=pd.DataFrame(index=data["y"].columns)).write_h5ad(tmp_path / "frac.h5ad")
    with pytest.raises(ValueError, match=r"y\.X holds non-integer values"):
        _eiv_fit(data, anndata.read_h5ad(tmp_path / "frac.h5ad", backed="r"), anndata.read_h5ad(gpath, backed="r"))


@pytest.mark.slow
def test_glmeiv_backed_on_a_cluster_reads_on_the_workers(eiv):
    """On a 2-worker LocalCluster the blocks of pairs read their columns on the workers:
    what the client sends for a backed input is what it sends for counts in memory less
    the counts (the readers weigh a few kB)."""
    distributed = pytest.importorskip("distributed")
    cloudpickle = pytest.importorskip("cloudpickle")
    from skmixed._parallel import local_cluster, parallel_config  # noqa: PLC0415

    data, mpath, gpath = eiv
    ref = _eiv_fit(data, data["y"], data["grna"])
    sent = {"memory": [], "backed": []}
    with local_cluster(2, host="127.0.0.1", worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        real_scatter = client.scatter
        for kind in sent:
            def scatter(obj, _log=sent[kind], **kw):
                _log.append(len(cloudpickle.dumps(obj)))
                return real_scatter(obj, **kw)

            client.scatter = scatter
            y, g = (data["y"], data["grna"]) if kind == "memory" else (
                anndata.read_h5ad(mpath, backed="r"), anndata.read_h5ad(gpath, backed="r"))
            with parallel_config(client=client):
                m = _eiv_fit(data, y, g)
            _same_eiv(m, ref)
    counts_bytes = 8 * (data["y"].size + data["grna"].size)  # float64 in memory
    assert sum(sent["backed"]) < sum(sent["memory"]) - 0.9 * counts_bytes


def test_cli_zinbwave_backed_equals_in_memory(zinb, tmp_path, capsys):
    """``skmixed zinbwave --backed`` streams the file and writes the same W (run in
    process through skmixed.cli.main, which the console script calls)."""
    from skmixed.cli import main  # noqa: PLC0415

    _, paths = zinb
    outs = {}
    for flag in ([], ["--backed"]):
        out = tmp_path / f"out{len(flag)}.h5ad"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["zinbwave", str(paths["csr"]), "-k", "2", "--max-iter", "3", "--random-state", "0",
                         "--out", str(out), "-q", *flag]) == 0
        outs[len(flag)] = anndata.read_h5ad(out)
    assert "ZINBWaVE, K = 2, on 350 cells x 60 genes" in capsys.readouterr().out
    np.testing.assert_array_equal(outs[1].obsm["X_zinbwave"], outs[0].obsm["X_zinbwave"])
    assert (outs[1].X != outs[0].X).nnz == 0  # the counts copied to the output file
