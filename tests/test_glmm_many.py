"""PoissonGLMM over count matrices: one model per gene, vectorised across genes."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.special
import scipy.stats

from skmixed import PoissonGLMM
from skmixed.datasets import make_zeb2_like
from skmixed.mixed import _multigene


@pytest.fixture(scope="module")
def genes():
    d = make_zeb2_like(5000, random_state=4)
    rng = np.random.default_rng(1)
    G = 12
    X = pd.get_dummies(d.cell_group, prefix="cell_group", prefix_sep="", dtype=float)
    lt = np.log(d.total_count.to_numpy())
    pat = pd.factorize(d.patient_assignment, sort=True)[0]
    grp = d.cell_group.cat.codes.to_numpy()
    Y = np.stack(
        [
            rng.poisson(np.exp(rng.normal(-8, 1) + rng.normal(0, 0.3, 20)[grp] + rng.normal(0, 0.25, 16)[pat] + lt))
            for _ in range(G)
        ],
        axis=1,
    )
    Y[:, 5] = 0  # an all-zero gene
    Y[:, 6] = 0
    Y[:7, 6] = 1  # a nearly-zero gene
    return d, X, Y, lt


def _single(X, y, d, lt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PoissonGLMM(fit_intercept=False, **kw).fit(X, y, groups=d.patient_assignment, offset=lt)


def test_each_gene_equals_its_single_gene_fit(genes):
    d, X, Y, lt = genes
    many = PoissonGLMM(fit_intercept=False).fit(X, Y, groups=d.patient_assignment, offset=lt)
    assert many.coef_.shape == (Y.shape[1], X.shape[1])
    for g in [0, 3, 11]:
        one = _single(X, Y[:, g], d, lt)
        np.testing.assert_allclose(many.coef_[g], one.coef_, atol=1e-6)
        np.testing.assert_allclose(many.coef_se_[g], one.coef_se_, rtol=1e-6)
        assert many.theta_[g, 0] == pytest.approx(one.theta_[0], abs=1e-6)
        assert many.loglik_[g] == pytest.approx(one.loglik_, abs=1e-6)
        # and the full-data path (no reduction to sufficient statistics) agrees too
        full = _single(X, Y[:, g], d, lt, collapse=False)
        np.testing.assert_allclose(many.coef_[g], full.coef_, atol=1e-6)
        b1 = one.random_effects_.set_index("level").condval
        bm = many.random_effects_.query("gene == @many.gene_names_[@g]").set_index("level").condval
        np.testing.assert_allclose(bm.loc[b1.index], b1, atol=1e-6)


def test_all_zero_genes_are_flagged_not_fatal(genes):
    d, X, Y, lt = genes
    many = PoissonGLMM(fit_intercept=False).fit(X, Y, groups=d.patient_assignment, offset=lt)
    assert many.flags_[5] == "all_zero" and np.all(np.isnan(many.coef_[5]))
    assert not many.converged_[5]
    # the nearly-zero gene has cell groups without a single count: MLE at -inf, flagged
    assert many.flags_[6] == "zero_count_group"
    ok = np.setdiff1d(np.arange(Y.shape[1]), [5, 6])
    assert np.all(many.converged_[ok])
    assert set(many.genes_.columns) >= {"gene", "sdcor", "loglik", "converged", "flag", "total_count"}


@pytest.mark.parametrize("kind", ["sparse_csr", "sparse_csc", "dataframe"])
def test_input_formats_agree(genes, kind):
    d, X, Y, lt = genes
    dense = PoissonGLMM(fit_intercept=False).fit(X, Y, groups=d.patient_assignment, offset=lt)
    Yk = {
        "sparse_csr": sp.csr_matrix(Y),
        "sparse_csc": sp.csc_matrix(Y),
        "dataframe": pd.DataFrame(Y, columns=[f"G{j}" for j in range(Y.shape[1])]),
    }[kind]
    other = PoissonGLMM(fit_intercept=False).fit(X, Yk, groups=d.patient_assignment, offset=lt)
    np.testing.assert_allclose(other.coef_, dense.coef_, atol=1e-10, equal_nan=True)
    np.testing.assert_allclose(other.loglik_, dense.loglik_, atol=1e-8, equal_nan=True)
    if kind == "dataframe":
        assert other.gene_names_[0] == "G0"


def test_chunks_do_not_change_results(genes, monkeypatch):
    d, X, Y, lt = genes
    whole = PoissonGLMM(fit_intercept=False).fit(X, Y, groups=d.patient_assignment, offset=lt)
    monkeypatch.setattr(_multigene, "CHUNK_GENES", 1)  # one gene per chunk
    chunked = PoissonGLMM(fit_intercept=False).fit(X, Y, groups=d.patient_assignment, offset=lt)
    np.testing.assert_allclose(chunked.coef_, whole.coef_, atol=1e-10, equal_nan=True)


def test_contrasts_and_benjamini_hochberg(genes):
    d, X, Y, lt = genes
    many = PoissonGLMM(fit_intercept=False).fit(X, Y, groups=d.patient_assignment, offset=lt)
    a, b = "cell_groupT : R : diseased", "cell_groupT : R : healthy"
    table = many.contrast({"T rectum, UC vs healthy": {a: 1.0, b: -1.0}})
    i, j = many.fixed_names_.index(a), many.fixed_names_.index(b)
    est = many.coef_[:, i] - many.coef_[:, j]
    se = np.sqrt(many.coef_cov_[:, i, i] + many.coef_cov_[:, j, j] - 2 * many.coef_cov_[:, i, j])
    np.testing.assert_allclose(table.estimate, est, equal_nan=True)
    np.testing.assert_allclose(table.std_error, se, equal_nan=True)
    assert set(table.distribution) == {"t"}
    p = 2 * scipy.stats.t.sf(np.abs(est / se), table.df.to_numpy())
    np.testing.assert_allclose(table.p_value, p, equal_nan=True)
    ok = np.isfinite(p)
    np.testing.assert_allclose(table.q_value[ok], scipy.stats.false_discovery_control(p[ok]), rtol=1e-12)
    assert table.q_value.isna().sum() == 1  # the all-zero gene
    with pytest.raises(ValueError, match="not a fixed effect"):
        many.contrast({"bad": {"nope": 1.0}})


def test_continuous_covariate_without_reduction():
    rng = np.random.default_rng(3)
    n, G = 600, 4
    g = np.repeat(np.arange(15), 40)
    x = rng.standard_normal(n)
    Y = np.stack([rng.poisson(np.exp(0.5 + 0.3 * x + rng.normal(0, 0.5, 15)[g])) for _ in range(G)], 1)
    many = PoissonGLMM().fit(x[:, None], Y, groups=g)
    for k in range(G):
        one = PoissonGLMM().fit(x[:, None], Y[:, k], groups=g)
        assert many.intercept_[k] == pytest.approx(one.intercept_, abs=1e-6)
        np.testing.assert_allclose(many.coef_[k], one.coef_, atol=1e-6)
    pred = many.predict(x[:5, None], groups=g[:5])
    assert pred.shape == (5, G)


def test_many_gene_bad_input(genes):
    d, X, Y, lt = genes
    with pytest.raises(ValueError, match="non-negative"):
        PoissonGLMM().fit(X, -Y, groups=d.patient_assignment)
    with pytest.raises(ValueError, match="groups is required"):
        PoissonGLMM().fit(X, Y)
    with pytest.raises(NotImplementedError, match="one grouping factor"):
        PoissonGLMM(nagq=3).fit(X, Y, groups=d.patient_assignment)
    with pytest.raises(ValueError, match="rows but X has"):
        PoissonGLMM().fit(X, Y[:-1], groups=d.patient_assignment)


def test_sparse_column_sums_equal_dense():
    rng = np.random.default_rng(5)
    Y = rng.poisson(0.4, (30, 9)).astype(float)
    Y[:, [0, 4, 8]] = 0  # empty columns, including the first and the last
    w = rng.uniform(0.5, 2, 30)
    dense = _multigene._column_sums_lgamma_saturated(Y, w)
    sparse = _multigene._column_sums_lgamma_saturated(sp.csc_matrix(Y), w)
    for a, b in zip(dense, sparse):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    lg = (scipy.special.gammaln(Y + 1) * w[:, None]).sum(0)
    np.testing.assert_allclose(dense[0], lg, rtol=1e-12)


def test_planted_differential_expression_is_recovered():
    from skmixed.datasets import make_boland_like_counts

    cells, counts, truth = make_boland_like_counts(150, 8000, frac_de=0.3, random_state=3)
    assert 0.05 < counts.nnz / np.prod(counts.shape) < 0.15
    X = pd.get_dummies(cells.cell_group, prefix="cell_group", prefix_sep="", dtype=float)
    model = PoissonGLMM(fit_intercept=False).fit(
        X, counts, groups=cells.patient_assignment, offset=np.log(cells.total_count)
    )
    table = model.contrast([[1.0 if n == "cell_groupT : R : diseased" else -1.0 if n == "cell_groupT : R : healthy"
                             else 0.0 for n in model.fixed_names_]])
    ok = np.isfinite(table.estimate.to_numpy()) & truth.de.to_numpy()
    r = np.corrcoef(table.estimate.to_numpy()[ok], truth.log_fold_change.to_numpy()[ok])[0, 1]
    assert r > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("skmixed._backend", fromlist=["x"]).cupy_available(), reason="needs CuPy and CUDA")
def test_many_genes_on_gpu_equal_cpu(genes):
    import cupy as cp

    d, X, Y, lt = genes
    cpu = PoissonGLMM(fit_intercept=False).fit(X, Y, groups=d.patient_assignment, offset=lt)
    gpu = PoissonGLMM(fit_intercept=False).fit(X, cp.asarray(Y, dtype=float), groups=d.patient_assignment, offset=lt)
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, atol=1e-8, equal_nan=True)
    np.testing.assert_allclose(gpu.coef_se_, cpu.coef_se_, rtol=1e-7, equal_nan=True)


# ------------------------------------------ summary and score per gene (issue 10, point 5)
def test_many_gene_summary_score_and_qvalues(genes):
    """``summary()`` gives tidy per-gene tables (it raised AttributeError); ``score``
    works on sparse, DataFrame and AnnData counts (it raised InvalidParameterError /
    numpy's dimension error) and is the mean of the per-gene Poisson D^2, each equal
    to scikit-learn's ``d2_tweedie_score(power=1)``; ``results_`` carries BH q-values."""
    from sklearn.metrics import d2_tweedie_score

    d, X, Y, lt = genes
    groups = d.patient_assignment
    m = _single(X, Y, d, lt)
    s = m.summary()
    assert list(s.fixed.columns[:9]) == ["gene", "term", "estimate", "std_error", "statistic", "df", "p_value",
                                          "q_value", "distribution"]
    assert len(s.fixed) == Y.shape[1] * X.shape[1] and len(s.fit) == Y.shape[1]
    ok = s.fixed.std_error.notna()
    crit = scipy.stats.t.ppf(0.975, s.fixed.df.to_numpy())[ok]
    np.testing.assert_allclose((s.fixed["ci_97.5%"] - s.fixed.estimate)[ok], crit * s.fixed.std_error[ok], rtol=1e-6)
    assert "Fixed effects" in repr(s)
    # q-values: BH over genes within each term
    for term, t in m.results_.groupby("term"):
        ok = t.p_value.notna()
        np.testing.assert_allclose(t.q_value[ok], scipy.stats.false_discovery_control(t.p_value[ok]), rtol=1e-12)
    # score: per-gene D^2, mean over genes with counts
    mu = m.predict(X, groups=groups, offset=lt)
    per_gene = m.score_genes(X, sp.csr_matrix(Y), groups=groups, offset=lt)
    for g in (0, 3, 11):
        assert per_gene.iloc[g] == pytest.approx(d2_tweedie_score(Y[:, g], mu[:, g], power=1), rel=1e-10)
    assert np.isnan(per_gene.iloc[5])  # all-zero gene: no deviance to explain
    expected = float(np.nanmean(per_gene))
    assert m.score(X, sp.csr_matrix(Y), groups=groups, offset=lt) == pytest.approx(expected)
    named = pd.DataFrame(Y, columns=m.gene_names_)
    fitted_named = _single(X, named, d, lt)
    assert fitted_named.score(X, named[named.columns[::-1]], groups=groups, offset=lt) == pytest.approx(expected)
    anndata = pytest.importorskip("anndata")
    ad = anndata.AnnData(sp.csr_matrix(Y.astype(float)), var=pd.DataFrame(index=m.gene_names_))
    assert fitted_named.score(X, ad, groups=groups, offset=lt) == pytest.approx(expected)
    with pytest.raises(ValueError, match="gene names of y differ from those seen at fit"):
        fitted_named.score(X, named.iloc[:, :5], groups=groups, offset=lt)


def test_tiny_pvalues_print_as_lme4_does():
    from skmixed.mixed._glmm import _format_pvalues

    t = pd.DataFrame({"estimate": [1.0, 2.0], "p_value": [0.0, 0.0123456]})
    out = _format_pvalues(t)
    assert list(out.p_value) == ["< 2e-16", "0.01235"] and t.p_value[0] == 0.0


def test_dense_counts_are_summed_by_row_blocks():
    """Dense counts go through the lgamma / saturated sums block by block (issue 14:
    a 68,627 x 5,000 matrix in one piece cost several full-size temporaries); the sums
    equal the sparse path's, weighted or not, integer or not, across several blocks."""
    rng = np.random.default_rng(0)
    Y = rng.poisson(0.3, (9000, 700)).astype(float)  # 6.3M entries: two row blocks
    w = rng.uniform(0.5, 2.0, 9000)
    assert len(_multigene._row_blocks(Y)) > 1
    for ww in (None, w):
        for Yx in (Y, Y + 0.5 * (Y > 0)):
            dense = _multigene._column_sums_lgamma_saturated(Yx, ww)
            sparse = _multigene._column_sums_lgamma_saturated(sp.csc_matrix(Yx), ww)
            for a, b in zip(dense, sparse):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)


def test_reml_gradient_and_mode_slopes_match_finite_differences(genes):
    """The batched REML criterion's exact theta gradient (implicit differentiation
    through the joint mode) and the mode's slopes against central differences, on
    genes with a cell group without counts (a frozen fixed effect) among them."""
    from skmixed.mixed._batched import BatchedScalarLaplace, LevelDesign

    d, X, Y, lt = genes
    keep = [0, 1, 2, 3, 4, 6, 7]  # gene 6 has counts in a few cells only
    Xa = X.to_numpy()
    codes = pd.factorize(d.patient_assignment, sort=True)[0]
    design = LevelDesign(Xa, codes, codes.max() + 1, lt, np.ones(lt.size))
    Yk = Y[:, keep].astype(float)
    eng = BatchedScalarLaplace(design, (Xa.T @ Yk).T, np.stack([np.bincount(codes, weights=y) for y in Yk.T]))
    assert eng.frozen().any()
    beta0 = np.log((Xa.T @ Yk).T + 0.5) - np.log(Xa.T @ np.exp(lt))
    ml = eng.fit(np.full(len(keep), 0.3), beta0)
    theta = np.abs(ml.theta) * 1.2 + 0.05
    pt = eng.reml_deviance(theta, ml.beta, ml.u, grad=True)
    h = 1e-5
    up, down = eng.reml_deviance(theta + h, ml.beta, ml.u), eng.reml_deviance(theta - h, ml.beta, ml.u)
    np.testing.assert_allclose(pt.g, (up[0] - down[0]) / (2 * h), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pt.J, (up[1] - down[1]) / (2 * h), atol=1e-6)
    np.testing.assert_allclose(pt.du, (up[2][0] - down[2][0]) / (2 * h), atol=1e-6)
