"""GLMEIV on CuPy equals the numpy fit (skipped without CuPy and a CUDA device)."""

import numpy as np
import pytest

from skmixed import _backend as B
from skmixed.eiv import GLMEIV, make_glmeiv_data

needs_cuda = pytest.mark.skipif(not B.cupy_available(), reason="needs CuPy and a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
@pytest.mark.parametrize("init", ["accelerated", "random"])
def test_gpu_fit_equals_cpu_fit(family, init):
    X, m, g, off, _ = make_glmeiv_data(3000, 3, pi=0.08, random_state=0)
    kw = dict(grna=g, offset=off["mrna"], grna_offset=off["grna"], pairs=[(j, j) for j in range(3)])
    cpu = GLMEIV(mrna_family=family, init=init, random_state=0).fit(X, m, **kw)
    gpu = GLMEIV(mrna_family=family, init=init, device="gpu", random_state=0).fit(X, m, **kw)
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(gpu.results_["std_error"], cpu.results_["std_error"], rtol=1e-6)
    assert gpu.converged_ == cpu.converged_


def test_device_gpu_without_cuda_is_a_clear_error():
    if B.cupy_available():
        pytest.skip("a device is present")
    X, m, g, off, _ = make_glmeiv_data(500, 1, pi=0.1, random_state=0)
    with pytest.raises(ValueError, match="CuPy"):
        GLMEIV(device="gpu").fit(X, m, grna=g)
