"""NegativeBinomialGLMM: glmmTMB nbinom2 reference values, quadrature against scipy,
the Poisson boundary, bad input, invariances and scikit-learn conventions."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.sparse as sp
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.utils.estimator_checks import parametrize_with_checks

from skmixed.mixed import _nb_cells, _nb_fused, _nb_multigene
from skmixed.mixed._glmm import PoissonGLMM
from skmixed.mixed._nb_zeros import ZeroSumExact, ZeroSumTable
from skmixed.mixed._nbglmm import NegativeBinomialGLMM

REF = Path(__file__).parent / "reference" / "nbglmm"

CASES = {
    "owls": "NCalls ~ (FoodTreatment + ArrivalTime) * SexParent + offset(logBroodSize) + (1 | Nest)",
    "salamanders": "count ~ spp * mined + (1 | site)",
    "zeb2nb": "y ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)",
}


def load_case(case):
    if case == "owls":
        return pd.read_csv(REF / "owls.csv")
    if case == "salamanders":
        data = pd.read_csv(REF / "salamanders.csv")
        levels = pd.read_csv(REF / "salamanders_levels.csv")
        for var in ("spp", "mined"):  # R's level order: the treatment contrasts depend on it
            data[var] = pd.Categorical(data[var], categories=list(levels.level[levels.variable == var]))
        return data
    data = pd.read_csv(REF / "zeb2_nb_data.csv.gz")
    data["cell_group"] = pd.Categorical(data.cell_group, categories=sorted(data.cell_group.unique()))
    return data


@pytest.fixture(scope="module", params=list(CASES))
def fitted(request):
    case = request.param
    data = load_case(case)
    model = NegativeBinomialGLMM.from_formula(CASES[case], data, reml=False)
    return case, data, model


def test_matches_glmmtmb(fitted):
    case, _, model = fitted
    fixef = pd.read_csv(REF / f"{case}_fixef.csv")
    summ = pd.read_csv(REF / f"{case}_summary.csv").iloc[0]
    assert model.fixed_names_ == list(fixef.term)
    np.testing.assert_allclose(model.fixed_effects_.to_numpy(), fixef.estimate, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(model.coef_cov_)), fixef.se, rtol=1e-3)
    np.testing.assert_allclose(model.size_, summ["size"], rtol=1e-3)
    np.testing.assert_allclose(model.size_se_, summ["size_se"], rtol=1e-3)
    np.testing.assert_allclose(model.variance_components_.sdcor.iloc[0], summ["sd"], rtol=1e-3)
    np.testing.assert_allclose(model.variance_components_.vcov.iloc[0], summ["vcov"], rtol=1e-3)
    np.testing.assert_allclose(model.loglik_, summ["loglik"], rtol=0, atol=1e-3)
    assert model.converged_ and not model.poisson_limit_
    # AIC counts the size among the parameters, as glmmTMB's
    assert model.aic_ == pytest.approx(-2 * summ["loglik"] + 2 * (len(fixef) + 2), abs=2e-3)


def test_random_effects_match_glmmtmb(fitted):
    case, _, model = fitted
    ref = pd.read_csv(REF / f"{case}_ranef.csv")
    ours = model.random_effects_.set_index("level").condval
    np.testing.assert_allclose(ours.loc[ref.level.astype(str)].to_numpy(), ref.condval, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_glmer_nb_stops_near_but_not_at_the_maximum(case):
    """lme4's glmer.nb alternates size and GLMM fits and stops on a tolerance: its
    estimates are close to the joint maximum (documented in the user guide) but not
    on it; the fixed effects differ by less than a tenth of their standard errors."""
    model = NegativeBinomialGLMM.from_formula(CASES[case], load_case(case), reml=False)
    nb = pd.read_csv(REF / f"{case}_glmernb.csv").set_index("term").estimate
    fixef = pd.read_csv(REF / f"{case}_fixef.csv")
    beta_nb = nb.loc[fixef.term].to_numpy()
    gap = np.abs(beta_nb - model.fixed_effects_.to_numpy()) / fixef.se.to_numpy()
    assert np.all(gap < 0.1)
    assert nb["theta"] == pytest.approx(model.size_, rel=0.05)


@pytest.mark.parametrize("case", ["owls", "salamanders"])
def test_reml_matches_glmmtmb(case):
    """reml=True: glmmTMB's REML = TRUE, theta and the size by the restricted criterion."""
    model = NegativeBinomialGLMM.from_formula(CASES[case], load_case(case), reml=True)
    fixef = pd.read_csv(REF / f"{case}_reml_fixef.csv")
    summ = pd.read_csv(REF / f"{case}_reml_summary.csv").iloc[0]
    np.testing.assert_allclose(model.fixed_effects_.to_numpy(), fixef.estimate, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(model.coef_cov_)), fixef.se, rtol=1e-3)
    np.testing.assert_allclose(model.size_, summ["size"], rtol=1e-3)
    np.testing.assert_allclose(model.variance_components_.sdcor.iloc[0], summ["sd"], rtol=1e-3)
    np.testing.assert_allclose(model.loglik_, summ["loglik"], rtol=0, atol=1e-3)


def _nb_logpmf(y, mu, size):
    return scipy.stats.nbinom.logpmf(y, size, size / (size + mu))


def test_adaptive_quadrature_is_the_integral():
    """nagq=25 maximises the marginal likelihood itself: at its estimates the reported
    log-likelihood equals scipy's adaptive quadrature of the integral over each site."""
    data = load_case("salamanders")
    model = NegativeBinomialGLMM.from_formula(CASES["salamanders"], data, reml=False, nagq=25)
    laplace = NegativeBinomialGLMM.from_formula(CASES["salamanders"], data, reml=False)
    X = model._parsed.X
    eta0 = X @ model.fixed_effects_.to_numpy()
    sd = float(model.variance_components_.sdcor.iloc[0])
    total = 0.0
    for site in data.site.unique():
        rows = (data.site == site).to_numpy()
        y, e = data["count"].to_numpy()[rows], eta0[rows]

        def integrand(z, y=y, e=e):
            return np.exp(np.sum(_nb_logpmf(y, np.exp(e + sd * z), model.size_)) + scipy.stats.norm.logpdf(z))

        total += np.log(scipy.integrate.quad(integrand, -12, 12, epsabs=0, epsrel=1e-12, limit=200)[0])
    assert model.loglik_ == pytest.approx(total, abs=1e-6)
    assert model.loglik_ >= laplace.loglik_ - 0.1  # the quadrature is not the Laplace value
    assert abs(model.size_ - laplace.size_) < 0.01 * laplace.size_


def _groups_data(n_groups=15, per=20, seed=0, size=2.0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per)
    x = rng.normal(size=g.size)
    off = rng.normal(0, 0.3, size=g.size)
    mu = np.exp(0.3 + 0.4 * x + off + rng.normal(0, 0.5, n_groups)[g])
    y = rng.poisson(rng.gamma(size, mu / size))
    return x[:, None], y.astype(float), g, off


def test_recovers_the_simulation_truth():
    X, y, g, off = _groups_data(40, 50, seed=1, size=2.0)
    model = NegativeBinomialGLMM(reml=False).fit(X, y, groups=g, offset=off)
    assert abs(model.coef_[0] - 0.4) < 3 * model.coef_se_[0]
    assert abs(model.size_ - 2.0) < 3 * model.size_se_


def test_poisson_limit_is_a_flagged_boundary():
    """Under-dispersed counts: the maximum is at size = inf, where the NB GLMM is the
    Poisson GLMM; flagged and equal to it, not a crash."""
    rng = np.random.default_rng(2)
    g = np.repeat(np.arange(10), 20)
    x = rng.normal(size=g.size)
    y = rng.binomial(20, 0.3 + 0.02 * (g % 3)).astype(float)
    with pytest.warns(UserWarning, match="Poisson limit"):
        model = NegativeBinomialGLMM(reml=False).fit(x[:, None], y, groups=g)
    assert model.poisson_limit_ and np.isinf(model.size_) and np.isnan(model.size_se_)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pois = PoissonGLMM(reml=False).fit(x[:, None], y, groups=g)
    np.testing.assert_allclose(model.coef_, pois.coef_, atol=1e-6)
    np.testing.assert_allclose(model.intercept_, pois.intercept_, atol=1e-6)
    np.testing.assert_allclose(model.loglik_, pois.loglik_, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nagq": 0}, "nagq"),
        ({"vcov": "sandwich"}, "vcov"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_parameters(kwargs, match):
    X, y, g, _ = _groups_data()
    with pytest.raises(ValueError, match=match):
        NegativeBinomialGLMM(**kwargs).fit(X, y, groups=g)


def test_bad_input_names_the_argument():
    X, y, g, off = _groups_data()
    bad = y.copy()
    bad[0] = -1
    with pytest.raises(ValueError, match="y must be non-negative"):
        NegativeBinomialGLMM().fit(X, bad, groups=g)
    with pytest.raises(ValueError, match="offset has 3 entries"):
        NegativeBinomialGLMM().fit(X, y, groups=g, offset=off[:3])
    with pytest.raises(ValueError, match="single level"):
        NegativeBinomialGLMM().fit(X, y, groups=np.zeros(y.size))
    with pytest.raises(ValueError, match="zero everywhere"):
        NegativeBinomialGLMM().fit(X, np.zeros_like(y), groups=g)


# -- invariances (hypothesis): one fitted reference, transformed data -------------------
_X, _Y, _G, _OFF = _groups_data(12, 15, seed=4)
_BASE = NegativeBinomialGLMM(reml=False).fit(_X, _Y, groups=_G, offset=_OFF)


def _same_fit(model, base=_BASE, atol=1e-6):
    np.testing.assert_allclose(model.coef_, base.coef_, atol=atol)
    np.testing.assert_allclose(model.size_, base.size_, rtol=atol)
    np.testing.assert_allclose(model.theta_, base.theta_, atol=atol)
    np.testing.assert_allclose(model.loglik_, base.loglik_, atol=atol)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_row_order_does_not_matter(seed):
    perm = np.random.default_rng(seed).permutation(_Y.size)
    model = NegativeBinomialGLMM(reml=False).fit(_X[perm], _Y[perm], groups=_G[perm], offset=_OFF[perm])
    _same_fit(model)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_group_relabelling_does_not_matter(seed):
    labels = np.random.default_rng(seed).permutation(100)[:12].astype(str)
    model = NegativeBinomialGLMM(reml=False).fit(_X, _Y, groups=labels[_G], offset=_OFF)
    _same_fit(model)


@settings(max_examples=5, deadline=None)
@given(shift=st.floats(-3, 3))
def test_offset_shift_moves_the_intercept(shift):
    model = NegativeBinomialGLMM(reml=False).fit(_X, _Y, groups=_G, offset=_OFF + shift)
    np.testing.assert_allclose(model.intercept_, _BASE.intercept_ - shift, atol=1e-6)
    _same_fit(model)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_duplicated_rows_equal_weight_two(seed):
    dup = np.random.default_rng(seed).random(_Y.size) < 0.3
    rows = np.concatenate([np.arange(_Y.size), np.flatnonzero(dup)])
    w = np.where(dup, 2.0, 1.0)
    a = NegativeBinomialGLMM(reml=False).fit(_X[rows], _Y[rows], groups=_G[rows], offset=_OFF[rows])
    b = NegativeBinomialGLMM(reml=False).fit(_X, _Y, groups=_G, offset=_OFF, sample_weight=w)
    _same_fit(a, b)


# -- many genes ------------------------------------------------------------------------
def _genes_data(n=1500, G=10, L=8, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, L, n)
    X = np.eye(3)[rng.integers(0, 3, n)]
    off = np.log(rng.integers(500, 5000, n)) - 7
    sizes = np.exp(rng.uniform(-1, 2, G))
    B = rng.normal(-0.5, 1, (G, 3))
    b = rng.normal(0, 0.4, (G, L))
    mu = np.exp(B @ X.T + b[:, g] + off).T
    Y = rng.poisson(rng.gamma(sizes, mu / sizes)).astype(float)
    Y[:, 1] = 0.0  # a gene without counts: flagged, the others fitted
    Y[X[:, 2] == 1, 2] = 0.0  # a cell group without counts
    return X, Y, g, off


@pytest.fixture(scope="module")
def many():
    X, Y, g, off = _genes_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = NegativeBinomialGLMM(fit_intercept=False, reml=False).fit(X, sp.csc_matrix(Y), groups=g, offset=off)
    return X, Y, g, off, model


def assert_genes_equal_single_fits(model, X, Y, g, off, *, reml, size_se_rtol=1e-6):
    """Each fitted gene of the many-gene ``model`` is the single-response fit of it."""
    assert list(model.genes_.flag[:3]) == ["", "all_zero", "zero_count_group"]
    for j in [0, 3, 4, 5, 6, 7, 8, 9]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            one = NegativeBinomialGLMM(fit_intercept=False, reml=reml).fit(X, Y[:, j], groups=g, offset=off)
        np.testing.assert_allclose(model.coef_[j], one.coef_, atol=1e-6)
        np.testing.assert_allclose(model.coef_se_[j], one.coef_se_, rtol=1e-6)
        np.testing.assert_allclose(model.size_[j], one.size_, rtol=1e-6)
        np.testing.assert_allclose(model.size_se_[j], one.size_se_, rtol=size_se_rtol)
        np.testing.assert_allclose(model.theta_[j, 0], one.theta_[0], atol=1e-6)
        np.testing.assert_allclose(model.loglik_[j], one.loglik_, atol=1e-6)
        np.testing.assert_allclose(model._b_genes[j], one.random_effects_.condval, atol=1e-6)
        assert model.converged_[j]


def test_many_genes_equal_single_gene_fits(many):
    X, Y, g, off, model = many
    assert_genes_equal_single_fits(model, X, Y, g, off, reml=False)
    assert np.isnan(model.coef_[1]).all() and np.isnan(model.size_[1])
    table = model.contrast({"x0 - x1": {"x0": 1.0, "x1": -1.0}})
    assert list(table.gene) == list(model.gene_names_) and table.p_value.notna().sum() == 9


def test_many_genes_poisson_limit_is_flagged():
    """An under-dispersed gene among overdispersed ones: flagged "poisson_limit" with
    size inf and the Poisson GLMM's estimates; the batch goes on."""
    X, Y, g, off = _genes_data(G=4, seed=3)
    patient = np.random.default_rng(5).normal(0, 0.5, 8)[g]
    Y[:, 3] = np.round(np.exp(1.0 + off + patient))  # the mean rounded: less variable than Poisson
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = NegativeBinomialGLMM(fit_intercept=False, reml=False).fit(X, Y, groups=g, offset=off)
        pois = PoissonGLMM(fit_intercept=False, reml=False).fit(X, Y[:, 3], groups=g, offset=off)
    assert model.genes_.flag[3] == "poisson_limit" and model.poisson_limit_[3]
    assert np.isinf(model.size_[3]) and np.isfinite(model.size_[0])
    np.testing.assert_allclose(model.coef_[3], pois.coef_, atol=1e-6)
    np.testing.assert_allclose(model.loglik_[3], pois.loglik_, atol=1e-6)


def test_many_genes_inputs_and_chunks_agree(many, monkeypatch):
    """Dense, DataFrame and AnnData counts, another chunk size, two threads, the numpy
    (not compiled) pass and the zeros summed cell by cell give the same fits."""
    import anndata

    from skmixed._parallel import parallel_config

    X, Y, g, off, model = many
    monkeypatch.setattr(_nb_multigene, "CHUNK_GENES", 3)
    monkeypatch.setattr(_nb_fused, "AVAILABLE", False)
    monkeypatch.setattr(_nb_cells, "ZeroSumTable", ZeroSumExact)  # zeros summed cell by cell
    names = [f"g{j}" for j in range(Y.shape[1])]
    for counts in (Y, pd.DataFrame(Y, columns=names), anndata.AnnData(sp.csr_matrix(Y))):
        with warnings.catch_warnings(), parallel_config(n_jobs=2):
            warnings.simplefilter("ignore", UserWarning)
            other = NegativeBinomialGLMM(fit_intercept=False, reml=False).fit(X, counts, groups=g, offset=off)
        np.testing.assert_allclose(other.coef_, model.coef_, atol=1e-8)
        np.testing.assert_allclose(other.size_, model.size_, rtol=1e-8)


def test_zero_sum_table_is_exact():
    rng = np.random.default_rng(1)
    n, P = 2000, 7
    pair = rng.integers(0, P, n)
    o = np.log(rng.integers(300, 40000, n)).astype(float)
    w = rng.random(n) + 0.5
    c = np.concatenate([rng.uniform(-70, 45, (30, P)), rng.uniform(-25, 5, (30, P))])
    exact, table = ZeroSumExact(pair, o, w, P)(c), ZeroSumTable(pair, o, w, P)(c)
    np.testing.assert_allclose(table, exact, rtol=1e-10)


EXPECTED_FAILED_CHECKS = {
    "check_sample_weight_equivalence_on_dense_data": (
        "as for PoissonGLMM: the check's data have as many coefficients as distinct rows with "
        "non-zero weight and zero counts among them, so the MLE does not exist."
    ),
}


@parametrize_with_checks([NegativeBinomialGLMM()], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_compatible(estimator, check):
    # without groups the model is an NB GLM; the checks' non-integer targets are warned about
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)
