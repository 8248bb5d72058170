"""NegBinOffsetMean: shapes, vectorisation, metamorphic relations, bad input."""

import warnings

import numpy as np
import pytest
import scipy.sparse
import scipy.stats
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV

from skmixed._families import NegativeBinomial, Poisson
from skmixed.offset import NegBinOffsetMean
from skmixed.offset._kernels import WeightColumns, _information, _newton, information_dense


def nb_data(n=600, G=3, beta=0.3, r=2.0, sd_o=0.5, seed=0):
    rng = np.random.default_rng(seed)
    o = rng.normal(0.0, sd_o, n)
    mu = np.exp(beta + o)[:, None]
    Y = rng.negative_binomial(r, r / (r + mu), size=(n, G)).astype(float)
    return o, Y, rng


# ------------------------------------------------------------------ kernels
def test_kernel_sums_are_the_family_derivatives():
    """The overdispersion-form sums of the kernels equal the NB family's methods."""
    rng = np.random.default_rng(3)
    y = rng.poisson(3.0, (50, 2)).astype(float)
    m = np.exp(rng.normal(size=(50, 1)))
    t = np.array([[0.7, 1.9]])
    r = np.array([[0.8, 12.0]])
    fam = NegativeBinomial(r)
    mu = t * m
    (info,) = _information(m, t, 1.0 / r)
    np.testing.assert_allclose(info, fam.information(mu), rtol=1e-13)
    score, obs = _newton(y, m, t, 1.0 / r)
    np.testing.assert_allclose(score, fam.score(y, mu), rtol=1e-12)
    np.testing.assert_allclose(obs, fam.observed_information(y, mu), rtol=1e-12)
    # phi = 0 is the Poisson family
    score, obs = _newton(y, m, t, np.zeros((1, 2)))
    np.testing.assert_allclose(score, Poisson.score(y, mu), rtol=1e-13)
    np.testing.assert_allclose(obs, Poisson.information(mu), rtol=1e-13)


def test_weight_columns_map_reduce_matches_dense():
    rng = np.random.default_rng(0)
    W = rng.uniform(size=(300, 7)) * (rng.uniform(size=(300, 7)) < 0.2)
    cols = WeightColumns.from_sparse(scipy.sparse.csc_matrix(W))
    A = rng.normal(size=(300, 4))
    T = rng.normal(size=(7, 4))
    (got,) = cols.map_reduce(lambda a, t: (a * t,), [A], [T], 1)
    expected = np.einsum("nb,ng,bg->bg", W, A, T)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(cols.linear(A), W.T @ A, atol=1e-12)
    # unsorted 0/1 elements without the sparse transpose: the same sums
    B01 = (W > 0).astype(float)
    r, c = np.nonzero(B01)
    perm = np.random.default_rng(1).permutation(r.size)
    el = WeightColumns.from_elements(r[perm], c[perm], 300, 7)
    np.testing.assert_allclose(el.linear(A), B01.T @ A, atol=1e-12)
    np.testing.assert_array_equal(el.count, B01.sum(0))


# ----------------------------------------------------------------- estimates
@pytest.mark.parametrize("kw", [{"family": "poisson"}, {"size": 2.0}, {"size": 2.0, "method": "mle"}, {"method": "mle"}])
def test_mle_solves_the_score_equation(kw):
    o, Y, _ = nb_data()
    y = Y[:, 0]
    m = NegBinOffsetMean(**kw).fit(o[:, None], y)
    mu = np.exp(m.coef_ + o)
    if kw.get("family") == "poisson":
        fam = Poisson
    else:
        fam = NegativeBinomial(m.size_)
    if kw.get("family") == "poisson" or kw.get("method") == "mle":
        assert abs(np.sum(fam.score(y, mu))) < 1e-8 * np.sum(y)
    # Fisher standard error and the Wald / score statistics
    assert m.coef_se_ == pytest.approx(1 / np.sqrt(np.sum(fam.information(mu))), rel=1e-10)
    assert m.z_ == pytest.approx(m.coef_ / m.coef_se_, rel=1e-12)
    assert m.pvalue_ == pytest.approx(2 * scipy.stats.norm.sf(abs(m.z_)), rel=1e-10)
    mu0 = np.exp(o)
    u0 = np.sum(fam.score(y, mu0)) / np.sqrt(np.sum(fam.information(mu0)))
    assert m.score_z_ == pytest.approx(u0, rel=1e-10)


def test_estimated_size_maximises_the_likelihood():
    o, Y, _ = nb_data(n=2000, r=1.5)
    y = Y[:, 0]
    m = NegBinOffsetMean(method="mle").fit(o[:, None], y)
    assert m.converged_
    eta = m.coef_ + o

    def ll(r, b=0.0):
        return np.sum(NegativeBinomial(r).loglik(y, eta + b))

    best = ll(m.size_)
    for f in (0.99, 1.01, 0.9, 1.1):
        assert ll(m.size_ * f) < best
    for b in (-1e-3, 1e-3):
        assert ll(m.size_, b) < best
    # the size is estimated near the truth
    assert abs(np.log(m.size_ / 1.5)) < 0.2


def test_no_overdispersion_gives_the_poisson_limit():
    rng = np.random.default_rng(5)
    o = rng.normal(0, 0.3, 3000)
    y = rng.binomial(6, np.exp(o) / 6.0).astype(float)  # underdispersed
    m = NegBinOffsetMean(method="mle").fit(o[:, None], y)
    p = NegBinOffsetMean(family="poisson").fit(o[:, None], y)
    assert m.size_ == np.inf
    assert m.coef_ == pytest.approx(p.coef_, abs=1e-12)
    assert m.coef_se_ == pytest.approx(p.coef_se_, rel=1e-12)


def test_constant_offsets_make_the_closed_form_exact():
    """With equal offsets the NB score equation is solved by the closed form."""
    _, Y, _ = nb_data()
    o = np.full(Y.shape[0], -0.4)
    cf = NegBinOffsetMean(size=1.3).fit(o[:, None], Y)
    ml = NegBinOffsetMean(size=1.3, method="mle").fit(o[:, None], Y)
    np.testing.assert_allclose(cf.coef_, ml.coef_, atol=1e-12)


# ------------------------------------------------------------- vectorisation
@pytest.mark.parametrize("kw", [{"family": "poisson"}, {"size": [1.0, 2.0, 4.0]}, {"size": 2.0, "method": "mle"}, {"method": "mle"}])
def test_vectorised_equals_one_fit_at_a_time(kw):
    o, Y, rng = nb_data(n=400)
    W = rng.uniform(size=(400, 4)) * (rng.uniform(size=(400, 4)) < 0.5)
    W[:5, 1] = 1.0
    many = NegBinOffsetMean(**kw).fit(o[:, None], Y, sample_weight=W)
    sparse = NegBinOffsetMean(**kw).fit(o[:, None], Y, sample_weight=scipy.sparse.csc_matrix(W))
    assert many.coef_.shape == (3, 4)
    for name in ("coef_", "coef_se_", "z_", "score_z_", "size_"):
        np.testing.assert_allclose(getattr(sparse, name), getattr(many, name), rtol=1e-12)
    for g in range(3):
        kw_g = dict(kw)
        if np.ndim(kw.get("size")) == 1:
            kw_g["size"] = kw["size"][g]
        for b in range(4):
            keep = W[:, b] > 0
            one = NegBinOffsetMean(**kw_g).fit(o[keep, None], Y[keep, g], sample_weight=W[keep, b])
            assert np.shape(one.coef_) == ()
            for name in ("coef_", "coef_se_", "z_", "score_z_", "size_"):
                assert getattr(one, name) == pytest.approx(getattr(many, name)[g, b], rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("spread", [0.0, 0.05, 1.0, 50.0])
def test_interpolated_information_equals_the_direct_sum(spread):
    """The dense-weight information (Chebyshev interpolation in phi * t, error bound
    1e-14) against the term-by-term sum: tight, wide (fallback) and zero spreads of t,
    a t exactly at 0 (no counts), shared and per-gene offsets, per-(b, g) phi."""
    rng = np.random.default_rng(3)
    n, B, G = 300, 40, 3
    Wd = rng.uniform(size=(n, B)) * (rng.uniform(size=(n, B)) < 0.7)
    M = np.exp(rng.normal(0, 1, (n, G)) - 4.0)
    M /= M.max(axis=0)
    t = np.exp(rng.normal(1.0, 1.0, G))[None, :] * np.exp(spread * rng.uniform(-1, 1, (B, G)))
    t[0, 1] = 0.0
    for phi in (np.array([[0.5, 2.0, 0.0]]), rng.uniform(0.1, 3.0, (B, G))):
        for Mg in (M, M[:, :1]):
            got = information_dense(Wd, Mg, t, phi)
            mu = t[None, :, :] * np.broadcast_to(Mg[:, None, :], (n, B, G))
            want = np.einsum("nb,nbg->bg", Wd, mu / (1.0 + phi[None, :, :] * mu))
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


def test_dense_and_sparse_weight_paths_agree():
    o, Y, rng = nb_data(n=500)
    W = (rng.uniform(size=(500, 30)) < 0.9).astype(float)
    assert WeightColumns.from_dense(W).Wd is not None  # dense enough for the BLAS path
    dense = NegBinOffsetMean(size=2.0).fit(o[:, None], Y, sample_weight=W)
    Wsp = scipy.sparse.csr_matrix(W)
    cols = WeightColumns.from_sparse(Wsp)
    cols.Wd = None
    from skmixed.offset._kernels import fit_offset_mean

    res = fit_offset_mean(Y, o, cols, size=2.0)
    np.testing.assert_allclose(dense.coef_, res.coef, rtol=1e-13)
    np.testing.assert_allclose(dense.coef_se_, res.se, rtol=1e-13)
    np.testing.assert_allclose(dense.score_z_, res.score_z, rtol=1e-12)


def test_output_shapes_and_predict():
    o, Y, rng = nb_data(n=200)
    X = o[:, None]
    W2 = (rng.uniform(size=(200, 5)) < 0.5).astype(float)
    cases = [(Y[:, 0], None, ()), (Y, None, (3,)), (Y[:, 0], W2, (5,)), (Y, W2, (3, 5)), (Y[:, :1], None, (1,))]
    for y, w, shape in cases:
        m = NegBinOffsetMean(size=2.0).fit(X, y, sample_weight=w)
        for name in ("coef_", "coef_se_", "z_", "pvalue_", "score_z_", "score_pvalue_", "size_", "converged_", "boundary_"):
            assert np.shape(getattr(m, name)) == shape, (name, shape)
        pred = m.predict(X)
        assert pred.shape == (200,) + shape
        np.testing.assert_allclose(pred, np.exp(np.asarray(m.coef_) + o.reshape((-1,) + (1,) * len(shape))))


def test_metamorphic_offset_shift_and_zero_weights():
    o, Y, rng = nb_data(n=500)
    w = rng.uniform(size=500)
    w[::3] = 0.0
    for kw in ({"family": "poisson"}, {"size": 2.0, "method": "mle"}, {"method": "mle"}):
        base = NegBinOffsetMean(**kw).fit(o[:, None], Y, sample_weight=w)
        shifted = NegBinOffsetMean(**kw).fit(o[:, None] + 0.7, Y, sample_weight=w)
        np.testing.assert_allclose(shifted.coef_, base.coef_ - 0.7, atol=1e-9)
        np.testing.assert_allclose(shifted.coef_se_, base.coef_se_, rtol=1e-9)
        keep = w > 0
        dropped = NegBinOffsetMean(**kw).fit(o[keep, None], Y[keep], sample_weight=w[keep])
        np.testing.assert_allclose(dropped.coef_, base.coef_, atol=1e-12)
        # two offset columns are summed
        two = NegBinOffsetMean(**kw).fit(np.column_stack([o, np.full(500, 0.7)]), Y, sample_weight=w)
        np.testing.assert_allclose(two.coef_, shifted.coef_, atol=1e-12)
        # row order does not matter
        perm = rng.permutation(500)
        permuted = NegBinOffsetMean(**kw).fit(o[perm, None], Y[perm], sample_weight=w[perm])
        np.testing.assert_allclose(permuted.coef_, base.coef_, atol=1e-10)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "y, w, match",
    [
        (np.array([1.0, np.nan, 2.0, 0.0]), None, "y"),
        (np.array([1.0, -1.0, 2.0, 0.0]), None, "y must be non-negative"),
        (np.zeros(4), None, "y is zero everywhere"),
        (np.array([1.0, 0.0, 2.0, 3.0]), np.array([0.5, 1.5, 0.0, 1.0]), "sample_weight must lie in"),
        (np.array([1.0, 0.0, 2.0, 3.0]), np.array([0.5, -0.1, 0.0, 1.0]), "sample_weight must lie in"),
        (np.array([1.0, 0.0, 2.0, 3.0]), np.array([0.5, np.nan, 0.0, 1.0]), "sample_weight must be finite"),
        (np.array([1.0, 0.0, 2.0, 3.0]), np.ones(3), "sample_weight has 3 rows"),
        (np.array([1.0, 0.0, 2.0, 3.0]), np.zeros((4, 2)), "sample_weight column 0 is all zero"),
    ],
)
def test_bad_input_raises(y, w, match):
    with pytest.raises(ValueError, match=match):
        NegBinOffsetMean().fit(np.zeros((4, 1)), y, sample_weight=w)


def test_bad_offsets_and_params():
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        NegBinOffsetMean().fit(np.zeros((3, 1)), np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        NegBinOffsetMean().fit(np.array([[0.0], [np.nan]]), np.ones(2))
    with pytest.raises(ValueError, match="2D"):
        NegBinOffsetMean().fit(np.zeros(4), np.ones(4))
    for kw, name in [({"family": "gamma"}, "family"), ({"method": "irls"}, "method"), ({"size": 0.0}, "size"),
                     ({"size": "big"}, "size"), ({"max_iter": 0}, "max_iter"), ({"tol": -1.0}, "tol")]:
        with pytest.raises(ValueError, match=name):
            NegBinOffsetMean(**kw).fit(np.zeros((4, 1)), np.ones(4))
    with pytest.raises(ValueError, match="size has 2 entries"):
        NegBinOffsetMean(size=[1.0, 2.0]).fit(np.zeros((4, 1)), np.ones((4, 3)))


def test_non_integer_counts_warn_and_are_flagged():
    with pytest.warns(UserWarning, match="non-integer"):
        m = NegBinOffsetMean(size=2.0).fit(np.zeros((4, 1)), np.array([0.5, 1.0, 2.0, 0.0]))
    assert not m.integer_response_


def test_all_zero_response_column_is_a_flagged_result():
    o, Y, _ = nb_data(n=100)
    Y[:, 1] = 0.0
    W = np.zeros((100, 2))
    W[:50, 0] = 1.0
    W[50:, 1] = 1.0
    Y[:50, 2] = 0.0  # gene 2 has no counts among the cells of weight column 0
    with pytest.warns(UserWarning, match="sum to zero in 3 fit"):
        m = NegBinOffsetMean(method="mle").fit(o[:, None], Y, sample_weight=W)
    expected = np.array([[False, False], [True, True], [True, False]])
    np.testing.assert_array_equal(m.boundary_, expected)
    assert np.all(m.coef_[expected] == -np.inf)
    assert np.all(np.isinf(m.coef_se_[expected])) and np.all(np.isnan(m.z_[expected]))
    assert np.all(np.isnan(m.pvalue_[expected]))
    assert np.all(np.isfinite(m.score_z_)) and np.all(m.score_z_[expected] < 0)
    assert np.all(np.isfinite(m.coef_[~expected]))
    assert np.all(m.predict(o[:, None])[:, expected] == 0.0)


def test_non_convergence_is_reported():
    o, Y, _ = nb_data(n=300, sd_o=1.5)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        m = NegBinOffsetMean(size=0.5, method="mle", max_iter=1).fit(o[:, None], Y)
    assert not np.all(m.converged_)


def test_size_search_failure_falls_back_to_moments():
    o, Y, _ = nb_data(n=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(UserWarning, match="method-of-moments"):
            m = NegBinOffsetMean(max_iter=1).fit(o[:, None], Y)
    assert np.all(m.size_fallback_)
    mu = np.exp(m.coef_ + o[:, None])
    phi = np.sum((Y - mu) ** 2 - Y, axis=0) / np.sum(mu**2, axis=0)
    np.testing.assert_allclose(m.size_, 1 / phi, rtol=1e-10)


# ---------------------------------------------------------- scikit-learn use
def test_clone_and_grid_search_with_weights():
    o, Y, rng = nb_data(n=300)
    w = (rng.uniform(size=300) < 0.6).astype(float)
    a = NegBinOffsetMean(method="mle").fit(o[:, None], Y[:, 0], sample_weight=w)
    b = clone(a).fit(o[:, None], Y[:, 0], sample_weight=w)
    assert a.coef_ == b.coef_ and a.size_ == b.size_
    search = GridSearchCV(NegBinOffsetMean(), {"family": ["poisson", "negative_binomial"]}, cv=3)
    search.fit(o[:, None], Y[:, 0], sample_weight=w)
    assert search.best_estimator_.coef_ is not None


# ------------------------------------------------------ score (issue 10, point 9)
def test_score_is_the_family_deviance_d2():
    """``score`` is D^2 of the family's deviance (it was R^2), as scikit-learn's
    Poisson regressors score: Poisson D^2 equals ``d2_tweedie_score(power=1)``; NB D^2
    uses the deviance of ``scipy.stats.nbinom`` at the fitted size."""
    from sklearn.metrics import d2_tweedie_score

    rng = np.random.default_rng(3)
    o = rng.normal(0, 0.7, 500)
    mu = np.exp(0.5 + o)
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)
    X = o[:, None]
    pois = NegBinOffsetMean(family="poisson").fit(X, y)
    assert pois.score(X, y) == pytest.approx(d2_tweedie_score(y, pois.predict(X), power=1), rel=1e-12)
    nb = NegBinOffsetMean().fit(X, y)
    r, m = nb.size_, nb.predict(X)

    def dev(mean):
        ll = scipy.stats.nbinom.logpmf(y, r, r / (r + mean))
        sat = scipy.stats.nbinom.logpmf(y, r, r / (r + np.maximum(y, 1e-300)))
        return 2 * np.sum(sat - ll)

    assert nb.score(X, y) == pytest.approx(1 - dev(m) / dev(np.full_like(y, y.mean())), rel=1e-9)
    with pytest.raises(ValueError, match="single fit"):
        NegBinOffsetMean().fit(X, np.column_stack([y, y + 1])).score(X, y)


def test_string_response_is_a_clear_error():
    X = np.zeros((20, 1))
    for y in (np.array(["1"] * 20), np.array(["a"] * 20)):
        with pytest.raises(ValueError, match="y must hold numeric counts"):
            NegBinOffsetMean().fit(X, y)


def test_weight_layouts_agree_and_the_input_is_left_alone():
    """CSC and CSR weights are read in their own layout, dense ones in C or Fortran
    order (issue 14: no format conversions); explicit zeros are dropped from a copy."""
    rng = np.random.default_rng(5)
    n, B = 3000, 40
    o = rng.normal(0, 0.5, n)
    y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o))).astype(float)
    W = scipy.sparse.random(n, B, density=0.05, format="csc", random_state=1)
    W.data[:] = np.round(W.data, 1)  # some explicit zeros
    assert np.any(W.data == 0)
    before = W.data.copy()
    ref = NegBinOffsetMean(size=2.0).fit(o[:, None], y, sample_weight=W.tocsr().toarray())
    for w in (W, W.tocsr(), W.toarray(), np.asfortranarray(W.toarray()), W.tocoo()):
        m = NegBinOffsetMean(size=2.0).fit(o[:, None], y, sample_weight=w)
        for name in ("coef_", "coef_se_", "z_", "score_z_"):
            np.testing.assert_allclose(getattr(m, name), getattr(ref, name), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(W.data, before)
    for bad, match in ((np.nan, "finite"), (np.inf, "finite"), (1.5, r"\[0, 1\]"), (-0.1, r"\[0, 1\]")):
        Wb = W.copy()
        Wb.data[3] = bad
        with pytest.raises(ValueError, match=match):
            NegBinOffsetMean(size=2.0).fit(o[:, None], y, sample_weight=Wb)
        with pytest.raises(ValueError, match=match):
            NegBinOffsetMean(size=2.0).fit(o[:, None], y, sample_weight=Wb.toarray())


def test_score_of_a_constant_response_is_nan():
    """No deviance to explain: NaN, not a ZeroDivisionError or a plausible number."""
    rng = np.random.default_rng(0)
    o = rng.normal(0, 0.5, 100)
    m = NegBinOffsetMean(family="poisson").fit(o[:, None], rng.poisson(np.exp(o)).astype(float))
    for y in (np.zeros(100), np.full(100, 3.0)):
        assert np.isnan(m.score(o[:, None], y))


@pytest.mark.parametrize("kw", [{"family": "poisson"}, {"size": 2.0}, {}, {"size": 2.0, "method": "mle"}])
def test_compiled_single_gene_passes_equal_the_numpy_passes(kw, monkeypatch):
    """One gene with CSC weights takes the compiled passes of ``offset/_fused.py`` (when
    numba is installed); they give the numpy passes' sums to rounding."""
    from skmixed.offset import _fused

    if not _fused.AVAILABLE:
        pytest.skip("numba is not installed: only the numpy passes exist")
    rng = np.random.default_rng(11)
    n, B = 4000, 60
    o = rng.normal(0, 0.5, n)
    y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o))).astype(float)
    W = scipy.sparse.random(n, B, density=0.03, format="csc", random_state=2)
    W.data[:] = np.where(W.data < 0.5, 1.0, np.round(W.data, 2))  # 0/1 and fractional weights
    fused = NegBinOffsetMean(**kw).fit(o[:, None], y, sample_weight=W)
    monkeypatch.setattr(_fused, "AVAILABLE", False)
    plain = NegBinOffsetMean(**kw).fit(o[:, None], y, sample_weight=W)
    for name in ("coef_", "coef_se_", "z_", "score_z_", "size_"):
        np.testing.assert_allclose(getattr(fused, name), getattr(plain, name), rtol=1e-11, atol=1e-14)


def test_compiled_dense_weight_scan_equals_the_numpy_reading(monkeypatch):
    """Dense weights large enough for the compiled scan (C and Fortran order) give the fits
    of the numpy reading; bad values and empty columns still raise the named errors."""
    from skmixed.offset import _fused

    if not _fused.AVAILABLE:
        pytest.skip("numba is not installed: only the numpy reading exists")
    rng = np.random.default_rng(12)
    n, B = 3000, 30
    o = rng.normal(0, 0.5, n)
    y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o))).astype(float)
    W = np.where(rng.uniform(size=(n, B)) < 0.05, np.round(rng.uniform(size=(n, B)), 2), 0.0)
    W[:3, :] = 1.0  # no empty column
    fits = [NegBinOffsetMean(size=2.0).fit(o[:, None], y, sample_weight=w) for w in (W, np.asfortranarray(W))]
    monkeypatch.setattr(_fused, "AVAILABLE", False)
    plain = NegBinOffsetMean(size=2.0).fit(o[:, None], y, sample_weight=W)
    monkeypatch.undo()
    for fit in fits:
        for name in ("coef_", "coef_se_", "score_z_"):
            np.testing.assert_allclose(getattr(fit, name), getattr(plain, name), rtol=1e-12, atol=1e-14)
    Wz = W.copy()
    Wz[:, 7] = 0.0
    with pytest.raises(ValueError, match="column 7 is all zero"):
        NegBinOffsetMean(size=2.0).fit(o[:, None], y, sample_weight=Wz)
    Wb = W.copy()
    Wb[2000, 5] = np.nan
    with pytest.raises(ValueError, match="finite"):
        NegBinOffsetMean(size=2.0).fit(o[:, None], y, sample_weight=np.asfortranarray(Wb))
