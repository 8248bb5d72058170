"""The fast passes of GLM-EIV against the direct formulas they replace."""

import numpy as np
import pytest

from skmixed._families import NegativeBinomial, Poisson
from skmixed.eiv._init import _dense_matrix, _dense_pass, _ratio_pieces, _reduced_pass, _take
from skmixed.eiv._model import _shifted, kernel, modality_estep, score_info


def _data(seed, n=3000, B=3):
    rng = np.random.default_rng(seed)
    eta = np.log(rng.uniform(5, 50, (n, B))) + rng.normal(0, 0.3, (n, B))
    y = rng.poisson(np.exp(eta)).astype(float)
    return y, eta, rng.uniform(-2.0, 1.5, B)


@pytest.mark.parametrize("family", [Poisson(), NegativeBinomial(np.array([3.0, 20.0, 1e4]))], ids=["poisson", "nb"])
def test_modality_estep_matches_kernels_and_newton_pieces(family):
    y, eta0, pert = _data(0)
    k0, k1, (s0, i0, s1, i1) = modality_estep(family, y, eta0, pert)
    np.testing.assert_allclose(k0, kernel(family, y, eta0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(k1, _shifted(family, y, eta0, pert), rtol=1e-12, atol=1e-9)
    for (s, i), eta in (((s0, i0), eta0), ((s1, i1), eta0 + pert[None, :])):
        s_ref, i_ref = score_info(family, y, eta)
        np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(i, i_ref, rtol=1e-12)


@pytest.mark.parametrize("nb", [False, True], ids=["poisson", "nb"])
def test_dense_pass_matches_gathered_pass(nb):
    # the reduced E-step by matrix products (all restarts) and by gathered runs: same sums
    y, L, _ = _data(1, n=5000, B=2)
    g, Lg, _ = _data(2, n=5000, B=2)
    fm = NegativeBinomial(np.array([5.0, 50.0])) if nb else Poisson()
    pm, pg = _ratio_pieces(fm, y, L), _ratio_pieces(Poisson(), g, Lg)
    rng = np.random.default_rng(3)
    K = 4
    pa, bm, bg = (rng.uniform(lo, hi, (2, K)).astype(np.float32) for lo, hi in ((1e-3, 0.3), (-2, 0.4), (-0.7, 2.3)))
    P, nbm = _dense_matrix(pm, pg)
    dense = _dense_pass(P, nbm, pa, bm, bg)
    rows = np.repeat(np.arange(2), K)
    gathered = _reduced_pass(_take(pm, rows), _take(pg, rows), pa.ravel(), bm.ravel(), bg.ravel())
    for a, b in zip(dense, gathered):
        np.testing.assert_allclose(np.asarray(a).ravel(), b, rtol=2e-5, atol=1e-3)


def test_dense_pass_without_loglik_keeps_the_m_step_sums():
    y, L, _ = _data(4, n=4000, B=1)
    g, Lg, _ = _data(5, n=4000, B=1)
    pm, pg = _ratio_pieces(Poisson(), y, L), _ratio_pieces(Poisson(), g, Lg)
    P, nbm = _dense_matrix(pm, pg)
    pa, bm, bg = (np.full((1, 3), v, dtype=np.float32) for v in (0.05, -1.0, 1.0))
    full = _dense_pass(P, nbm, pa, bm, bg)
    lean = _dense_pass(P, nbm, pa, bm, bg, with_ll=False)
    assert np.all(np.asarray(lean[0]) == 0) and np.all(np.asarray(full[0]) > 0)
    for a, b in zip(full[1:], lean[1:]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("opt_out", [False, True])
def test_tune_malloc_sets_glibc_thresholds_once_unless_opted_out(monkeypatch, opt_out):
    import skmixed._malloc as malloc_mod

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(malloc_mod, "_DONE", [])
    monkeypatch.setattr(malloc_mod.sys, "platform", "linux")
    monkeypatch.setattr(malloc_mod.ctypes, "CDLL", lambda name: FakeLibc())
    if opt_out:
        monkeypatch.setenv("SKMIXED_NO_MALLOPT", "1")
    else:
        monkeypatch.delenv("SKMIXED_NO_MALLOPT", raising=False)
    first, second = malloc_mod.tune_malloc(), malloc_mod.tune_malloc()
    # M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1) at glibc's dynamic maxima, set once
    assert calls == ([] if opt_out else [(-3, 32 * 2**20), (-1, 64 * 2**20)])
    assert first is second is (not opt_out)


def test_glmeiv_fit_tunes_malloc(monkeypatch):
    import skmixed.eiv._estimator as est
    from skmixed.eiv import GLMEIV, make_glmeiv_data

    calls = []
    monkeypatch.setattr(est, "tune_malloc", lambda: calls.append(1))
    X, m, g, off, _ = make_glmeiv_data(600, 1, pi=0.2, random_state=0)
    GLMEIV(mrna_family="poisson", n_restarts=3, random_state=0).fit(X, m, grna=g, offset=off["mrna"],
                                                                    grna_offset=off["grna"])
    assert calls == [1]
