"""Many-gene NegativeBinomialGLMM under REML (glmmTMB's REML = TRUE per gene): each
gene's fit is the single-response REML fit (itself glmmTMB-exact, test_nbglmm.py),
and the between-patient t test holds its level on null NB counts."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nbglmm import _genes_data, assert_genes_equal_single_fits

from skmixed.datasets import make_multipatient_counts
from skmixed.mixed._nbglmm import NegativeBinomialGLMM

BETWEEN = {"between": {"T : R : diseased": 1.0, "T : R : healthy": -1.0}}
WITHIN = {"within": {"T : R : healthy": 1.0, "T : PBMC : healthy": -1.0}}


def _fit(X, Y, g, off, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return NegativeBinomialGLMM(fit_intercept=False, **kwargs).fit(X, Y, groups=g, offset=off)


@pytest.fixture(scope="module")
def many_reml():
    X, Y, g, off = _genes_data()
    return X, Y, g, off, _fit(X, Y, g, off, reml=True)


def test_many_gene_reml_equals_single_gene_reml(many_reml):
    """Each gene's REML fit is the single-response REML fit (glmmTMB's REML = TRUE to
    the tolerances of test_nbglmm.py): estimates, SEs, size, theta, the REML logLik and
    the random effects at 1e-6; the size's SE (a second difference) at 1e-5."""
    X, Y, g, off, model = many_reml
    assert_genes_equal_single_fits(model, X, Y, g, off, reml=True, size_se_rtol=1e-5)


def test_reml_variance_exceeds_ml(many_reml):
    """Eight levels and three fixed effects: REML's patient variance is larger."""
    X, Y, g, off, reml = many_reml
    ml = _fit(X, Y, g, off, reml=False)
    live = reml.genes_.flag == ""
    assert np.all(reml.theta_[live, 0] ** 2 > ml.theta_[live, 0] ** 2)


def test_reml_between_patient_test_holds_the_level():
    """300 null genes with NB(size 5) cell noise on the 16-patient design, patient SD
    0.3: the rejection rate at 5% of the between- and within-patient t tests is within
    binomial noise of 5% (two-sided binomial test, p > 0.001)."""
    G = 300
    cells, counts, _ = make_multipatient_counts(G, 3000, sd_patient=0.3, noise="nb", size=5.0, frac_de=0.0,
                                                mean_log_rate=-9.5, random_state=5)
    X = pd.get_dummies(cells.cell_group, prefix="", prefix_sep="", dtype=float)
    m = _fit(X, counts, cells.patient_assignment, np.log(cells.total_count), reml=True)
    tab = m.contrast({**BETWEEN, **WITHIN})
    tab = tab[np.isfinite(tab.p_value.to_numpy())]
    for contrast in ("between", "within"):
        p = tab.p_value[tab.contrast == contrast].to_numpy()
        assert p.size > 0.9 * G
        k = int(np.sum(p < 0.05))
        assert scipy.stats.binomtest(k, p.size, 0.05).pvalue > 1e-3, (contrast, k / p.size)


def test_reml_chunks_and_numpy_pass_agree(many_reml, monkeypatch):
    """Another chunk size, the numpy (not compiled) pass and the zeros summed cell by
    cell give the same REML fits."""
    from skmixed.mixed import _nb_cells, _nb_fused, _nb_multigene
    from skmixed.mixed._nb_zeros import ZeroSumExact

    X, Y, g, off, model = many_reml
    monkeypatch.setattr(_nb_multigene, "CHUNK_GENES", 3)
    monkeypatch.setattr(_nb_fused, "AVAILABLE", False)
    monkeypatch.setattr(_nb_cells, "ZeroSumTable", ZeroSumExact)
    other = _fit(X, Y, g, off, reml=True)
    np.testing.assert_allclose(other.coef_, model.coef_, atol=1e-8)
    np.testing.assert_allclose(other.size_, model.size_, rtol=1e-8)
    np.testing.assert_allclose(other.theta_, model.theta_, atol=1e-8)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_reml_row_order_and_level_labels_do_not_matter(many_reml, seed):
    """Permuting the cells and relabelling the levels leaves every gene's REML fit."""
    X, Y, g, off, model = many_reml
    rng = np.random.default_rng(seed)
    perm = rng.permutation(Y.shape[0])
    labels = rng.permutation(100)[:8].astype(str)
    other = _fit(X[perm], Y[perm], labels[g][perm], off[perm], reml=True)
    live = model.genes_.flag.to_numpy() != "all_zero"
    np.testing.assert_allclose(other.coef_[live], model.coef_[live], atol=1e-6)
    np.testing.assert_allclose(other.size_[live], model.size_[live], rtol=1e-6)
    np.testing.assert_allclose(other.theta_[live], model.theta_[live], atol=1e-6)
    np.testing.assert_allclose(other.loglik_[live], model.loglik_[live], atol=1e-6)


def _engine(Y, X, g, off):
    from skmixed.mixed import _nb_multigene as mg

    w = np.ones(off.size)
    design = mg.PairDesign(X, g, g.max() + 1, off, w)
    nz = mg.NonZeros.from_columns(Y, w, design)
    return mg.BatchedNBLaplace(design, nz), mg._start(design, nz)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(dtheta=st.floats(0.0, 0.5), phi_scale=st.floats(0.3, 3.0))
def test_reml_gradient_and_mode_slopes_are_derivatives(dtheta, phi_scale):
    """The exact gradient of the REML criterion in (theta, phi) and the slopes of the
    joint mode (beta~, u~) are the central differences of the criterion and of the
    mode, at points away from the optimum; genes with a cell group without counts
    (frozen fixed effects) included."""
    X, Y, g, off = _genes_data()
    live = Y.sum(axis=0) > 0
    eng, start = _engine(Y[:, live], X, g, off)
    theta, phi = start[:, 0] + dtheta, start[:, -1] * phi_scale
    beta, u = start[:, 1:-1], np.zeros((theta.size, eng.L))
    _, beta, u, _, (db, du), grad = eng.reml_deviance(theta, phi, beta, u, grad=True)
    for j in range(2):
        h = 1e-5 * np.maximum(1.0, [theta, phi][j])
        e = np.zeros((theta.size, 2))
        e[:, j] = h
        plus = eng.reml_deviance(theta + e[:, 0], phi + e[:, 1], beta, u)
        minus = eng.reml_deviance(theta - e[:, 0], phi - e[:, 1], beta, u)
        np.testing.assert_allclose(grad[:, j], (plus[0] - minus[0]) / (2 * h), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(db[:, :, j], (plus[1] - minus[1]) / (2 * h[:, None]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(du[:, :, j], (plus[2] - minus[2]) / (2 * h[:, None]), rtol=1e-5, atol=1e-6)


def test_joint_newton_finds_the_nested_joint_mode():
    """Newton on (u, beta) together reaches the joint mode of the nested iteration
    (beta by its Schur complement, u by PIRLS at each beta), from far off."""
    X, Y, g, off = _genes_data()
    live = Y.sum(axis=0) > 0
    eng, start = _engine(Y[:, live], X, g, off)
    theta, phi = start[:, 0] + 0.3, start[:, -1]
    beta0, u0 = start[:, 1:-1] + 1.0, np.full((theta.size, eng.L), 0.5)
    b1, u1 = eng.joint_mode(theta, phi, beta0, u0)
    b2, u2 = eng._joint_mode_nested(theta, phi, beta0, u0)
    free = ~eng._frozen()
    np.testing.assert_allclose(b1[free], b2[free], atol=1e-9)
    np.testing.assert_allclose(u1, u2, atol=1e-9)


def test_reml_poisson_limit_is_the_poisson_reml_fit():
    """Under REML too, an under-dispersed gene among overdispersed ones reaches the
    Poisson boundary (flagged, size inf) with PoissonGLMM's REML fit (started from the
    moment estimate of the size, not from an ML fit)."""
    from skmixed import PoissonGLMM

    X, Y, g, off = _genes_data(G=4, seed=3)
    patient = np.random.default_rng(5).normal(0, 0.5, 8)[g]
    Y[:, 3] = np.round(np.exp(1.0 + off + patient))  # the mean rounded: less variable than Poisson
    model = _fit(X, Y, g, off, reml=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pois = PoissonGLMM(fit_intercept=False, reml=True).fit(X, Y[:, 3], groups=g, offset=off)
    assert model.genes_.flag[3] == "poisson_limit" and np.isinf(model.size_[3])
    np.testing.assert_allclose(model.coef_[3], pois.coef_, atol=1e-6)
    np.testing.assert_allclose(model.theta_[3], pois.theta_, rtol=1e-5)
    np.testing.assert_allclose(model.loglik_[3], pois.loglik_, atol=1e-6)
