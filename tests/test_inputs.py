"""One rule for AnnData input across estimators (issue 10, points 2, 3 and 9): the
``layer`` parameter, raw counts found the same way everywhere, non-integer values read
from AnnData an error naming the layer, genes matched by name, unique gene names."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from skmixed import PoissonGLMM, ZINBWaVE, resampling_test
from skmixed.datasets import make_zeb2_like, make_zinb_counts
from skmixed.offset import make_perturbation_screen

anndata = pytest.importorskip("anndata")


def _lognorm(Y):
    """What scanpy's normalize_total(target_sum=1e4) + log1p leave in .X."""
    Y = np.asarray(Y, dtype=float)
    return np.log1p(Y / np.maximum(Y.sum(axis=1, keepdims=True), 1.0) * 1e4)


# ------------------------------------------------------------------ ZINBWaVE
@pytest.fixture(scope="module")
def zinb_fit():
    sim = make_zinb_counts(200, 60, n_clusters=3, random_state=1)
    Y = np.asarray(sim.counts.toarray() if sp.issparse(sim.counts) else sim.counts)
    ad = anndata.AnnData(sp.csr_matrix(Y), var=pd.DataFrame(index=[f"g{j}" for j in range(Y.shape[1])]))
    model = ZINBWaVE(2, random_state=0, max_iter=30).fit(ad)
    return ad, Y, model


def test_zinbwave_transform_matches_anndata_genes_by_name(zinb_fit):
    """Fitted on an AnnData, ``transform(adata[:, ::-1])`` (same genes, other order)
    gives the W of ``transform(adata)``; before, the columns were taken by position
    (W correlating 0.24 with the right one)."""
    ad, Y, model = zinb_fit
    new = anndata.AnnData(sp.csr_matrix(Y[:50] + (Y[:50] == 0)), var=ad.var.copy())  # new cells
    W = model.transform(new)
    W_rev = model.transform(new[:, ::-1].copy())
    np.testing.assert_allclose(W_rev, W, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(model.feature_names_in_, ad.var_names.to_numpy())
    # other genes: an error naming them
    other = new[:, :-1].copy()
    with pytest.raises(ValueError, match="gene names of Y differ.*missing \\['g59'\\]"):
        model.transform(other)
    renamed = new.copy()
    renamed.var_names = [f"x{j}" for j in range(new.n_vars)]
    with pytest.raises(ValueError, match="gene names of Y differ"):
        model.transform(renamed)


def test_zinbwave_reads_the_counts_layer_and_refuses_normalised_x(zinb_fit):
    ad, Y, model = zinb_fit
    norm = anndata.AnnData(_lognorm(Y), var=ad.var.copy())
    with pytest.raises(ValueError, match=r"Y\.X holds non-integer values.*layer='counts'"):
        ZINBWaVE(2, max_iter=2).fit(norm)
    norm.layers["counts"] = sp.csr_matrix(Y)
    a = ZINBWaVE(2, random_state=0, max_iter=30).fit(norm)  # the counts layer by default
    np.testing.assert_allclose(a.W_, model.W_, rtol=1e-10, atol=1e-12)
    b = ZINBWaVE(2, random_state=0, max_iter=30, layer="counts").fit(norm)
    np.testing.assert_allclose(b.W_, model.W_, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="layer='raw' is not a layer"):
        ZINBWaVE(2, layer="raw").fit(norm)
    with pytest.raises(ValueError, match="applies to AnnData input only"):
        ZINBWaVE(2, layer="counts").fit(Y)


def test_dataframe_feature_names_keep_scikit_learn_rule(zinb_fit):
    _, Y, _ = zinb_fit
    df = pd.DataFrame(Y, columns=[f"g{j}" for j in range(Y.shape[1])])
    model = ZINBWaVE(2, random_state=0, max_iter=5).fit(df)
    with pytest.raises(ValueError, match="feature names"):
        model.transform(df[df.columns[::-1]])


# -------------------------------------------------------------- PoissonGLMM
@pytest.fixture(scope="module")
def cells_counts():
    d = make_zeb2_like(3000, random_state=2)
    rng = np.random.default_rng(0)
    grp = d.cell_group.cat.codes.to_numpy()
    pat = pd.factorize(d.patient_assignment, sort=True)[0]
    lt = np.log(d.total_count.to_numpy())
    Y = np.stack([rng.poisson(np.exp(-7 + rng.normal(0, 0.3, 20)[grp] + rng.normal(0, 0.3, 16)[pat] + lt))
                  for _ in range(5)], axis=1)
    X = pd.get_dummies(d.cell_group, prefix="cell_group", prefix_sep="", dtype=float)
    return d, X, Y, lt


def _fit(y, d, X, lt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PoissonGLMM(fit_intercept=False, **kw).fit(X, y, groups=d.patient_assignment, offset=lt)


def test_poisson_glmm_reads_counts_not_normalised_x(cells_counts):
    """After normalize_total + log1p, ``.X`` holds log-normalised values: an error
    naming ``.X`` (before: a warning, and coefficients of the wrong data); with a
    ``"counts"`` layer the counts are used, as ZINBWaVE does."""
    d, X, Y, lt = cells_counts
    var = pd.DataFrame(index=[f"g{j}" for j in range(Y.shape[1])])
    ad = anndata.AnnData(_lognorm(Y), var=var)
    with pytest.raises(ValueError, match=r"y\.X holds non-integer values"):
        _fit(ad, d, X, lt)
    ad.layers["counts"] = sp.csr_matrix(Y)
    ref = _fit(Y, d, X, lt)
    for kw in ({}, {"layer": "counts"}):
        m = _fit(ad, d, X, lt, **kw)
        np.testing.assert_allclose(m.coef_, ref.coef_, rtol=1e-10)
        assert list(m.gene_names_) == list(var.index)
    with pytest.raises(ValueError, match="layer='nope' is not a layer"):
        _fit(ad, d, X, lt, layer="nope")
    with pytest.raises(ValueError, match="layer must be None or the name"):
        _fit(ad, d, X, lt, layer=3)


def test_duplicate_gene_names_are_refused(cells_counts):
    d, X, Y, lt = cells_counts
    names = ["a", "b", "a", "c", "d"]
    with pytest.raises(ValueError, match="duplicate gene names.*'a'"):
        _fit(pd.DataFrame(Y, columns=names), d, X, lt)
    ad = anndata.AnnData(sp.csr_matrix(Y.astype(float)), var=pd.DataFrame(index=names))
    with pytest.raises(ValueError, match="duplicate gene names.*var_names_make_unique"):
        _fit(ad, d, X, lt)
    with pytest.raises(ValueError, match="duplicate gene names"):
        ZINBWaVE(2).fit(pd.DataFrame(Y + 1, columns=names))


# ----------------------------------------------------------- resampling test
def test_resampling_test_takes_anndata_with_gene_names():
    counts, treatment, cov, _ = make_perturbation_screen(800, 3, 2, treated_fraction=0.1, random_state=0)
    ad = anndata.AnnData(sp.csr_matrix(counts.to_numpy().astype(float)), var=pd.DataFrame(index=counts.columns))
    pairs = [("gene2", "pert1"), ("gene0", "pert0")]
    a = resampling_test(counts, treatment, cov, pairs=pairs, n_resamples=49, random_state=0)
    b = resampling_test(ad, treatment, cov, pairs=pairs, n_resamples=49, random_state=0)
    pd.testing.assert_frame_equal(a, b)
    ad.layers["counts"] = ad.X.copy()
    ad.X = _lognorm(counts.to_numpy())
    c = resampling_test(ad, treatment, cov, pairs=pairs, n_resamples=49, random_state=0)
    pd.testing.assert_frame_equal(a, c)
    norm = anndata.AnnData(ad.X, var=ad.var.copy())
    with pytest.raises(ValueError, match=r"counts\.X holds non-integer values"):
        resampling_test(norm, treatment, cov, pairs=pairs, n_resamples=49)
    with pytest.raises(ValueError, match="layer='raw' is not a layer"):
        resampling_test(ad, treatment, cov, pairs=pairs, n_resamples=49, layer="raw")


def test_glmeiv_takes_anndata_by_the_same_rule():
    from skmixed import GLMEIV
    from skmixed.eiv import make_glmeiv_data

    X, m, g, off, _ = make_glmeiv_data(3000, 2, pi=0.05, random_state=0)
    kw = dict(offset=off["mrna"], grna_offset=off["grna"], pairs=[("a", "p"), ("b", "q")])
    ad_m = anndata.AnnData(sp.csr_matrix(m.astype(float)), var=pd.DataFrame(index=["a", "b"]))
    ad_g = anndata.AnnData(sp.csr_matrix(g.astype(float)), var=pd.DataFrame(index=["p", "q"]))
    a = GLMEIV(mrna_family="poisson", random_state=0).fit(X, pd.DataFrame(m, columns=["a", "b"]),
                                                          grna=pd.DataFrame(g, columns=["p", "q"]), **kw)
    b = GLMEIV(mrna_family="poisson", random_state=0).fit(X, ad_m, grna=ad_g, **kw)
    pd.testing.assert_frame_equal(a.results_, b.results_)
    ad_m.layers["counts"] = ad_m.X.copy()
    ad_m.X = _lognorm(m)
    c = GLMEIV(mrna_family="poisson", random_state=0).fit(X, ad_m, grna=ad_g, **kw)
    pd.testing.assert_frame_equal(a.results_, c.results_)
    del ad_m.layers["counts"]
    with pytest.raises(ValueError, match=r"y\.X holds non-integer values"):
        GLMEIV(mrna_family="poisson").fit(X, ad_m, grna=ad_g, **kw)
