"""The compiled reduced E-step of GLM-EIV (numba, the ``fast`` extra) against the numpy pass."""

import numpy as np
import pandas as pd
import pytest

from skmixed._families import NegativeBinomial, Poisson
from skmixed.eiv import GLMEIV, _fused
from skmixed.eiv import _init as init_mod
from skmixed.eiv._init import _dense_matrix, _dense_pass, _ratio_pieces, reduced_em

pytestmark = pytest.mark.skipif(not _fused.AVAILABLE, reason="numba is not installed")


def _pieces(seed, n, B, nb):
    rng = np.random.default_rng(seed)
    L = np.log(rng.uniform(0.05, 3.0, (n, B)))
    y = rng.poisson(np.exp(L) * rng.gamma(4.0, 0.25, (n, B))).astype(float)
    Lg = np.log(rng.uniform(0.01, 0.5, (n, B)))
    g = rng.poisson(np.exp(Lg) * np.where(rng.random((n, B)) < 0.05, 6.0, 1.0)).astype(float)
    fm = NegativeBinomial(rng.uniform(2.0, 40.0, B)) if nb else Poisson()
    return _ratio_pieces(fm, y, L), _ratio_pieces(Poisson(), g, Lg)


def test_vectorised_exp_and_log1p_are_float32_accurate():
    x = -np.concatenate([np.geomspace(1e-8, 86.0, 4000), [0.0]]).astype(np.float32)
    out, ib = np.empty_like(x), np.empty(x.size, np.int32)
    _fused._vexp_neg(x, out, ib)
    np.testing.assert_allclose(out, np.exp(x.astype(float)), rtol=3e-7)
    v = np.concatenate([[0.0], np.geomspace(1e-12, 1e30, 8000)]).astype(np.float32)
    o = np.empty_like(v)
    _fused._vlog1p(v.copy(), o, np.empty(v.size, np.int32))
    np.testing.assert_allclose(o, np.log1p(v.astype(float)), rtol=3e-7, atol=0)


@pytest.mark.parametrize("nb", [False, True], ids=["poisson", "nb"])
@pytest.mark.parametrize("with_ll", [True, False])
def test_fused_sums_match_the_numpy_dense_pass(nb, with_ll):
    # every restart of every pair, over cells that are not a multiple of the block size
    B, K, n = 3, 5, 5003
    pm, pg = _pieces(0, n, B, nb)
    rng = np.random.default_rng(1)
    pa, bm, bg = (rng.uniform(lo, hi, (B, K)).astype(np.float32)
                  for lo, hi in ((1e-4, 0.3), (np.log(0.1), np.log(1.5)), (np.log(0.5), np.log(10.0))))
    P, nbm = _dense_matrix(pm, pg)
    ref = np.stack([np.asarray(a, dtype=float).reshape(-1) for a in _dense_pass(P, nbm, pa, bm, bg, with_ll)], 1)
    Pf, NBf = _fused.pieces(pm, pg)
    got = _fused.reduced_sums(Pf, NBf, np.repeat(np.arange(B), K), pa.ravel().astype(float),
                              bm.ravel().astype(float), bg.ravel().astype(float), with_ll=with_ll)
    # float32 passes both: sums of 5,000 cells agree to a few 1e-6
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    if not with_ll:
        assert np.all(got[:, 0] == 0)


def test_fused_sums_of_extreme_runs():
    # posteriors that saturate at 1 (d past float32's exponential range: 60 gRNA counts
    # where 2 are expected) and at 0 (pi = 1e-30), against the numpy pass; runs the EM
    # must drop (pi = 0, an infinite coefficient) get NaN sums
    n = 3000
    rng = np.random.default_rng(2)
    p = np.arange(n) % 20 == 0
    Lm = np.log(rng.uniform(0.5, 2.0, (n, 1)))
    M = rng.poisson(np.exp(Lm)).astype(float)
    Lg = np.full((n, 1), np.log(2.0))
    G = np.where(p, 60.0, rng.poisson(2.0, n))[:, None].astype(float)
    pm, pg = _ratio_pieces(NegativeBinomial(np.array([8.0])), M, Lm), _ratio_pieces(Poisson(), G, Lg)
    pi = np.array([1e-30, 0.05, 0.3, 0.0, 0.1])
    bm = np.array([-1.0, 0.0, -2.0, -1.0, -np.inf])
    bg = np.array([0.5, np.log(20.0), 4.0, 0.5, 0.5])
    P, nbm = _dense_matrix(pm, pg)
    f = np.float32
    ref = np.stack([np.asarray(a, dtype=float).ravel()
                    for a in _dense_pass(P, nbm, pi[None, :3].astype(f), bm[None, :3].astype(f), bg[None, :3].astype(f))], 1)
    out = _fused.reduced_sums(*_fused.pieces(pm, pg), np.zeros(5, dtype=np.int64), pi, bm, bg)
    np.testing.assert_allclose(out[:3], ref, rtol=2e-5, atol=1e-6)
    assert np.all(np.isnan(out[3:]))
    assert out[0, 1] < 1e-12  # pi = 1e-30: no cell is perturbed
    assert abs(out[1, 1] - p.sum()) < 1e-3  # the 150 cells with 60 counts, with probability 1
    assert out[1, 0] > 80.0 * p.sum()  # softplus(d) = d past the exponential's range


@pytest.mark.parametrize("nb", [False, True], ids=["poisson", "nb"])
def test_reduced_em_is_the_same_with_and_without_the_compiled_pass(monkeypatch, nb):
    n, B, K = 6000, 2, 15
    rng = np.random.default_rng(3)
    p = rng.random((n, B)) < 0.05
    Lm = np.log(rng.uniform(0.5, 2.0, (n, B)))
    Lg = np.log(rng.uniform(0.05, 0.2, (n, B)))
    M = rng.poisson(np.exp(Lm + np.where(p, np.log(0.25), 0.0))).astype(float)
    G = rng.poisson(np.exp(Lg + np.where(p, np.log(20.0), 0.0))).astype(float)
    fm = NegativeBinomial(np.array([10.0, 10.0])) if nb else Poisson()
    guesses = tuple(np.broadcast_to(rng.uniform(lo, hi, K)[None, :], (B, K))
                    for lo, hi in ((1e-5, 0.03), (np.log(0.1), np.log(1.5)), (np.log(0.5), np.log(10.0))))
    fast = reduced_em(fm, Poisson(), M, G, Lm, Lg, guesses)
    monkeypatch.setattr(_fused, "usable", lambda xp: False)
    slow = reduced_em(fm, Poisson(), M, G, Lm, Lg, guesses)
    best_fast, best_slow = init_mod.select_best(*fast), init_mod.select_best(*slow)
    # both float32 initialisations: the same best run to float32 accuracy
    for a, b in zip(best_fast, best_slow):
        np.testing.assert_allclose(a, b, rtol=1e-4)
    assert abs(best_fast[0][0] - 0.05) < 0.01


def test_glmeiv_fit_is_the_same_without_the_compiled_pass(monkeypatch):
    from skmixed.eiv import make_glmeiv_data

    X, m, g, off, _ = make_glmeiv_data(8000, 2, pi=0.03, mrna_size=15.0, random_state=4)
    kw = {"grna": g, "offset": off["mrna"], "grna_offset": off["grna"], "pairs": [(0, 0), (1, 1)]}
    fast = GLMEIV(random_state=0).fit(X, m, **kw)
    monkeypatch.setattr(_fused, "usable", lambda xp: False)
    slow = GLMEIV(random_state=0).fit(X, m, **kw)
    a, b = fast.results_, slow.results_
    assert isinstance(a, pd.DataFrame) and len(a) == len(b)
    # the EM converges to the same maximum from either initialisation
    np.testing.assert_allclose(a["estimate"], b["estimate"], atol=1e-3 * float(a["std_error"].min()))
    np.testing.assert_allclose(a["std_error"], b["std_error"], rtol=1e-5)


@pytest.mark.parametrize("fams", ["nb_poisson", "poisson_nb"])
def test_em_sums_match_the_numpy_e_step_m_step_and_louis(fams):
    from skmixed.eiv._inference import louis_information, observed_pieces
    from skmixed.eiv._model import Design, base_eta, e_step, modality_estep

    rng = np.random.default_rng(5)
    n, B = 3001, 3  # not a multiple of the block
    Z = np.column_stack([np.ones(n), rng.integers(0, 2, n), rng.normal(size=n)])
    design = Design(Z)
    M = rng.poisson(2.0, (n, B)).astype(float)
    G = rng.poisson(0.3, (n, B)).astype(float)
    om = np.log(rng.uniform(0.5, 2, (n, 1)))  # shared offset
    og = np.log(rng.uniform(0.5, 2, (n, B)))  # one per pair
    nb, pois = NegativeBinomial(np.array([3.0, 10.0, 50.0])), Poisson()
    fm, fg = (nb, pois) if fams == "nb_poisson" else (pois, nb)
    cm, cg = rng.normal(0, 0.3, (B, 4)), rng.normal(0, 0.3, (B, 4))
    cm[:, 1], cg[:, 1] = -1.0, 1.5
    pi = np.array([0.02, 0.1, 0.3])
    m0, m1, sm = modality_estep(fm, M, base_eta(Z, cm, om), cm[:, 1])
    g0, g1, sg = modality_estep(fg, G, base_eta(Z, cg, og), cg[:, 1])
    T, ll = e_step(m0 + g0, m1 + g1, pi, np.zeros(B))
    Tf, llk, sums = _fused.em_sums(design, fm, fg, *(np.ascontiguousarray(a.T) for a in (M, G, om, og)), pi, cm, cg)
    np.testing.assert_allclose(Tf.T, T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(llk + n * np.log1p(-pi), ll, rtol=1e-13)
    for j, (st, k0, k1) in enumerate(((sm, m0, m1), (sg, g0, g1))):
        s0, i0, s1, i1 = st
        q, grad, Gi, _ = sums.modality(j)
        np.testing.assert_allclose(q, np.sum((1 - T) * k0 + T * k1, axis=0), rtol=1e-12)
        np.testing.assert_allclose(grad, design.stacked_grad((1 - T) * s0, T * s1), rtol=1e-11, atol=1e-9)
        np.testing.assert_allclose(Gi, design.stacked_gram((1 - T) * i0, T * i1), rtol=1e-12)
    pieces = (observed_pieces(fm, *sm), observed_pieces(fg, *sg))
    info, S = louis_information(design, fm, fg, M, G, om, og, pi, cm, cg, T, pieces, score=True)
    info_f, S_f = sums.louis()
    np.testing.assert_allclose(info_f, info, rtol=1e-11, atol=1e-9 * np.abs(info).max())
    np.testing.assert_allclose(S_f, S, rtol=1e-11, atol=1e-9)


@pytest.mark.parametrize("init", ["accelerated", "random"])
def test_full_em_is_the_same_with_the_compiled_e_step(monkeypatch, init):
    import skmixed.eiv._em as em_mod
    from skmixed.eiv import make_glmeiv_data

    # pairs with weak and strong gRNAs, one offset per pair for the gRNA
    X, m, g, off, _ = make_glmeiv_data(6000, 3, pi=0.04, mrna_size=8.0, random_state=7)
    kw = {"grna": g, "offset": off["mrna"], "grna_offset": off["grna"], "pairs": [(0, 0), (1, 1), (2, 2)]}
    fast = GLMEIV(init=init, n_restarts=5, random_state=1).fit(X, m, **kw)
    monkeypatch.setattr(em_mod._fused, "usable", lambda xp: False)
    slow = GLMEIV(init=init, n_restarts=5, random_state=1).fit(X, m, **kw)
    np.testing.assert_allclose(fast.results_["estimate"], slow.results_["estimate"], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fast.results_["std_error"], slow.results_["std_error"], rtol=1e-8)
    np.testing.assert_array_equal(fast.pairs_["n_iter"], slow.pairs_["n_iter"])
    for a, b in zip(fast.loglik_path_, slow.loglik_path_):
        np.testing.assert_allclose(a, b, rtol=1e-10)  # sums in another order


def test_glmeiv_reference_fits_without_numba():
    # numba is installed wherever this file runs; the numpy passes (the fallback, and the
    # CuPy path's code) are held to glmeiv's reference fits in a process without it
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SKMIXED_DISABLE_NUMBA="1")
    code = ("import sys, pytest; import skmixed.eiv._fused as f; assert not f.AVAILABLE; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_eiv_reference.py']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


@pytest.mark.parametrize("nb", [False, True], ids=["poisson", "nb"])
def test_glm_sums_and_pilot_fits_match_numpy(monkeypatch, nb):
    import skmixed.eiv._em as em_mod
    from skmixed.eiv._init import fit_pilot
    from skmixed.eiv._model import Design, glm_pieces

    rng = np.random.default_rng(8)
    n, C = 4099, 3
    Z = np.column_stack([np.ones(n), rng.integers(0, 2, n), rng.normal(size=n)])
    design = Design(Z)
    O = np.log(rng.uniform(0.5, 2.0, (n, 1)))
    Y = rng.poisson(np.exp(O + 0.3 + 0.2 * Z[:, 1:2]) * rng.gamma(5.0, 0.2, (n, C))).astype(float)
    fam = NegativeBinomial(np.array([2.0, 8.0, 40.0])) if nb else Poisson()
    coef = rng.normal(0, 0.2, (C, 3))
    q, grad, H = _fused.glm_sums(design, fam, np.ascontiguousarray(Y.T), np.ascontiguousarray(O.T), coef)
    k, (s, i) = glm_pieces(fam, Y, Z @ coef.T + O)
    np.testing.assert_allclose(q, k.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(grad, s.T @ Z, rtol=1e-11, atol=1e-9)
    np.testing.assert_allclose(H, design.gram(i), rtol=1e-12)
    family = "negative_binomial" if nb else "poisson"
    fast = fit_pilot(design, Y, O, family)
    monkeypatch.setattr(em_mod._fused, "usable", lambda xp: False)
    slow = fit_pilot(design, Y, O, family)
    np.testing.assert_allclose(fast[0], slow[0], rtol=1e-10, atol=1e-12)
    if nb:
        np.testing.assert_allclose(fast[2], slow[2], rtol=1e-9)
