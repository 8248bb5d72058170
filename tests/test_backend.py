"""The numpy/CuPy backend: the same code on both namespaces."""

import numpy as np
import pytest

from skmixed import _backend as B
from skmixed._families import Poisson
from skmixed.glm._newton import fit_glm

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not B.cupy_available(), reason="needs CuPy and a CUDA device")


def _glm_data(seed=0):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(2000), rng.standard_normal((2000, 3))])
    off = rng.normal(0, 0.3, 2000)
    coef = rng.normal(0, 0.3, (5, 4))
    Y = rng.poisson(np.exp(X @ coef.T + off[:, None])).astype(float)
    return X, Y, off


def test_numpy_namespace_and_helpers():
    x = np.array([0.0, 1.0, 2.0])
    assert B.get_namespace(x) is np
    assert B.to_host(x) is not None and B.to_device(x, np) is not None
    np.testing.assert_allclose(B.segment_sum(np.ones((4, 2)), np.array([0, 1, 1, 0]), 2), [[2, 2], [2, 2]])
    L = B.cholesky(np.array([[4.0, 2.0], [2.0, 3.0]]))
    np.testing.assert_allclose(B.cho_solve(L, np.array([1.0, 2.0])), np.linalg.solve([[4, 2], [2, 3]], [1, 2]))
    assert B.safe_exp(np.array([1000.0]))[0] == np.exp(700.0)
    with pytest.raises(np.linalg.LinAlgError):
        B.cholesky(np.array([[1.0, 2.0], [2.0, 1.0]]))


def test_batched_glm_equals_one_at_a_time():
    X, Y, off = _glm_data()
    batched = fit_glm(X, Y, Poisson, offset=off)
    for g in range(Y.shape[1]):
        single = fit_glm(X, Y[:, g], Poisson, offset=off)
        np.testing.assert_allclose(batched.coef[g], single.coef[0], atol=1e-10)


@gpu
@needs_cuda
def test_glm_cupy_equals_numpy():
    import cupy as cp

    X, Y, off = _glm_data(1)
    cpu = fit_glm(X, Y, Poisson, offset=off)
    dev = fit_glm(cp.asarray(X), cp.asarray(Y), Poisson, offset=cp.asarray(off))
    assert B.get_namespace(dev.coef) is cp
    np.testing.assert_allclose(B.to_host(dev.coef), cpu.coef, atol=1e-10)
    np.testing.assert_allclose(B.to_host(dev.loglik), cpu.loglik, rtol=1e-12)


@gpu
@needs_cuda
def test_family_kernels_cupy_equal_numpy():
    import cupy as cp

    y = np.arange(50, dtype=float)
    eta = np.linspace(-3, 4, 50)
    for fn in (Poisson.loglik, Poisson.loglik_kernel):
        np.testing.assert_allclose(B.to_host(fn(cp.asarray(y), cp.asarray(eta))), fn(y, eta), rtol=1e-12)
    np.testing.assert_allclose(B.to_host(Poisson.saturated_loglik(cp.asarray(y))), Poisson.saturated_loglik(y), rtol=1e-12)
