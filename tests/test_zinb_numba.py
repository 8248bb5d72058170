"""The fused numba kernel of ZINBWaVE against the numpy ZINB family (the source of truth).

Both paths run here: the kernel (when numba is installed) and the numpy path that runs
without numba or on CuPy; their per-entry values agree to 1e-12 and whole fits to 1e-10.
"""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from skmixed import ZINBWaVE
from skmixed._families import ZINB
from skmixed.datasets import make_zinb_counts
from skmixed.zinb import _evaluate, _kernels_numba
from skmixed.zinb._data import Counts
from skmixed.zinb._init import initialize
from skmixed.zinb._model import Design, Penalty

pytestmark = pytest.mark.skipif(not _kernels_numba.available(), reason="needs numba (the 'fast' extra)")

finite = {"allow_nan": False, "allow_infinity": False}


def family(Y, a, b, z, mode):
    """The numpy family's outputs for a dense block ``Y`` (the kernel's reference)."""
    zz = np.broadcast_to(z, a.shape)
    pos = Y > 0
    if mode == _kernels_numba.LOGLIK:
        return np.stack([ZINB.loglik(Y, a, b, zz)])
    zeta = mode == _kernels_numba.DERIVS_ZETA
    zero = ZINB.derivatives_zero(a, b, zz, zeta=zeta)
    ys = np.where(pos, Y, 1.0)
    # the count tables, as evaluate() passes them for a common dispersion
    lognorm, dpsi, dtri = ZINB.count_tables(float(np.exp(np.ravel(z)[0])), int(ys.max()))
    yi = ys.astype(int)
    posv = ZINB.derivatives_positive(ys, a, b, zz, zeta=zeta, lognorm=lognorm[yi], dpsi=dpsi[yi], dtri=dtri[yi])
    return np.stack([np.where(pos, p, q) for p, q in zip(posv, zero)])


def kernel(Y, a, b, z, mode, n_threads=1):
    Ycsr = sp.csr_matrix(Y)
    Ycsr.sort_indices()
    y_max = int(Ycsr.data.max()) if Ycsr.nnz else 0
    z = np.broadcast_to(np.asarray(z, float), (a.shape[1],))
    tables = ZINB.count_tables(float(np.exp(z[0])), y_max) if np.all(z == z[0]) else None
    out, fused = _kernels_numba.block(a, b, z, Ycsr.indptr, Ycsr.indices, Ycsr.data, 0, tables, mode,
                                      n_threads=n_threads)
    return out, fused


def close(got, want, rtol, terms=1.0):
    """Relative agreement; ``terms``: the size of the largest term that ``want`` sums."""
    scale = np.maximum(np.abs(want), np.maximum(terms, 1.0))
    err = np.abs(got - want) / scale
    assert np.all(np.isfinite(got) == np.isfinite(want))
    assert float(np.max(err, initial=0.0)) <= rtol, float(np.max(err))


@pytest.mark.parametrize("mode", [_kernels_numba.LOGLIK, _kernels_numba.DERIVS, _kernels_numba.DERIVS_ZETA])
@pytest.mark.parametrize("z", [-2.0, 0.7, 4.0])
def test_kernel_equals_family_on_a_grid_crossing_every_branch(mode, z):
    # t = a - z from -40 to 40 (the log1pmx form below t = -5), b from -40 to 40 (both
    # signs of the logits, P(0) < 1e-3 where mu is large and pi small), counts 0..60
    a = np.linspace(-40, 40, 61)[:, None] + np.zeros((1, 47))
    b = np.zeros((61, 1)) + np.linspace(-40, 40, 47)[None, :]
    Y = np.random.default_rng(0).poisson(3.0, a.shape) * (np.random.default_rng(1).random(a.shape) < 0.4)
    Y = Y.astype(float)
    out, fused = kernel(Y, a, b, z, mode)
    assert fused
    want = family(Y, a, b, z, mode)
    # the derivatives sum terms up to (theta (|t| + 1))^2 weighted by 1 - r (r: the dropout
    # posterior), which is a rounding error where r rounds to 1: both sides then carry
    # noise of that size times 1e-16, so they are compared to 1e-12 of the terms' size
    terms = (np.exp(z) * (np.abs(a - z) + 1.0)) ** 2
    for k in range(out.shape[0]):
        close(out[k], want[k], 1e-12, terms if k >= 1 else 1.0)


@given(st.floats(-30, 30, **finite), st.floats(-30, 30, **finite), st.floats(-4, 4.5, **finite),
       st.integers(0, 500))
def test_kernel_equals_family_entrywise(a, b, z, y):
    A, B = np.array([[a, a]]), np.array([[b, -b]])
    Y = np.array([[float(y), 0.0]])
    out, _ = kernel(Y, A, B, z, _kernels_numba.DERIVS_ZETA)
    want = family(Y, A, B, z, _kernels_numba.DERIVS_ZETA)
    terms = (np.exp(z) * (np.abs(A - z) + 1.0)) ** 2  # as in the grid test
    for k in range(8):
        close(out[k], want[k], 1e-12, terms if k >= 1 else 1.0)


def test_threads_and_per_gene_dispersion_and_large_theta():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 2, (40, 30)), rng.normal(-1, 3, (40, 30))
    Y = rng.poisson(np.exp(a)) * (rng.random(a.shape) < 0.5).astype(float)
    for z in (rng.normal(1, 1, 30), np.full(30, 5.0)):  # per gene: no tables; theta > 100: dpsi not fused
        out, fused = kernel(Y, a, b, z, _kernels_numba.DERIVS_ZETA)
        assert not fused
        zero = family(np.zeros_like(Y), a, b, z, _kernels_numba.DERIVS_ZETA)
        terms = (np.exp(z) * (np.abs(a - z) + 1.0)) ** 2  # as in the grid test
        for k in range(8):  # the caller applies the positive formulas: zeros everywhere here
            close(out[k], zero[k], 1e-12, terms if k >= 1 else 1.0)
    serial, _ = kernel(Y, a, b, 0.5, _kernels_numba.DERIVS, n_threads=1)
    threaded, _ = kernel(Y, a, b, 0.5, _kernels_numba.DERIVS, n_threads=2)
    np.testing.assert_array_equal(serial, threaded)


@pytest.fixture(scope="module")
def problem():
    sim = make_zinb_counts(300, 80, n_clusters=3, random_state=2)
    Y = sp.csr_matrix(sim.counts)
    n, J = Y.shape
    X, V = sim.batch_design, np.ones((J, 1))
    off = np.log(np.asarray(Y.sum(1)).ravel() / 20)
    design = Design(X, V, off, None, Penalty.zinbwave(X, V, n, J), 3)
    counts = Counts(Y, np, batch_size=70)
    counts.n_threads = 2
    P = initialize(counts, design, 3, np.random.default_rng(0))
    return counts, design, P


@pytest.mark.parametrize("zeta_kind", ["common", "per_gene"])
def test_evaluate_equals_numpy_path(problem, zeta_kind):
    counts, design, P = problem
    P = P.copy()
    if zeta_kind == "per_gene":
        P.zeta[:] = np.linspace(-0.5, 1.5, P.zeta.size)
    blocks = [(slice(0, 70), None), (slice(210, 300), None), (np.array([5, 77, 150]), None),
              (slice(70, 140), np.array([0, 3, 40, 79])), (np.array([1, 2, 299]), np.array([7, 8]))]
    for rows, cols in blocks:
        for derivs, zeta in ((False, False), (True, False), (True, True)):
            fast = _evaluate.evaluate(design, counts, P, rows, cols, derivs=derivs, zeta=zeta)
            previous = _evaluate.use_kernel("numpy")
            try:
                slow = _evaluate.evaluate(design, counts, P, rows, cols, derivs=derivs, zeta=zeta)
            finally:
                _evaluate.use_kernel(previous)
            assert len(fast) == len(slow)
            for f, s in zip(fast, slow):
                close(f, s, 1e-12)


def test_fit_equals_numpy_path():
    sim = make_zinb_counts(250, 70, n_clusters=3, random_state=4)
    kw = {"random_state": 0, "max_iter": 8, "tol": 0.0, "batch_size": 60}
    fast = ZINBWaVE(3, **kw)
    with pytest.warns(Warning):
        fast.fit(sim.counts)
    previous = _evaluate.use_kernel("numpy")
    try:
        slow = ZINBWaVE(3, **kw)
        with pytest.warns(Warning):
            slow.fit(sim.counts)
    finally:
        _evaluate.use_kernel(previous)
    np.testing.assert_allclose(fast.objective_history_, slow.objective_history_, rtol=1e-10)
    np.testing.assert_allclose(fast.W_, slow.W_, rtol=1e-7, atol=1e-8)


def test_use_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match="kernel"):
        _evaluate.use_kernel("fortran")


def test_elementary_functions_match_libm():
    x = -np.concatenate([np.geomspace(1e-300, 700, 4000), [0.0]])
    e, em1 = np.empty_like(x), np.empty_like(x)
    _kernels_numba._vexp(x, e, em1, np.empty(x.size, np.int64), np.empty_like(x))
    np.testing.assert_allclose(e, np.exp(x), rtol=4e-16)
    np.testing.assert_allclose(em1, np.expm1(x), rtol=4e-16)
    v = np.geomspace(1e-300, 1e300, 5001)
    out = np.empty_like(v)
    _kernels_numba._vlog(v, out, np.empty(v.size, np.int64))
    np.testing.assert_allclose(out, np.log(v), rtol=4e-16, atol=1e-300)
    near = 1.0 + np.linspace(-0.3, 0.4, 2001)
    _kernels_numba._vlog(near, out[:2001], np.empty(2001, np.int64))
    np.testing.assert_allclose(out[:2001], np.log(near), rtol=1e-15, atol=4e-17)
