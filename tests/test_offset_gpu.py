"""NegBinOffsetMean and the resampling test on CuPy arrays equal the numpy results
(skipped without CuPy and a CUDA device); the device code paths that run on numpy too
are checked here on the CPU."""

import numpy as np
import pytest
import scipy.sparse

from skmixed import _backend as B
from skmixed.offset import NegBinOffsetMean, make_perturbation_screen, resampling_test
from skmixed.offset._kernels import DeviceWeightColumns, WeightColumns, fit_offset_mean

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not B.cupy_available(), reason="needs CuPy and a CUDA device")
FITS = [{"family": "poisson"}, {"size": 2.0}, {"size": 2.0, "method": "mle"}, {"method": "mle"}, {}]


def _data(n=500, G=3, Bw=6, seed=0):
    rng = np.random.default_rng(seed)
    o = rng.normal(0, 0.5, n)
    Y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o))[:, None], size=(n, G)).astype(float)
    W = rng.uniform(size=(n, Bw)) * (rng.uniform(size=(n, Bw)) < 0.4)
    return o, Y, W


@pytest.mark.parametrize("kw", FITS)
def test_device_weight_columns_equal_the_cpu_ones(kw):
    """The GPU weight container, run on numpy arrays, gives the CPU fits."""
    o, Y, W = _data()
    r, c = np.nonzero(W)
    dev = DeviceWeightColumns(r, c, W[r, c], *W.shape)
    dev._CHUNK = 300  # several chunks
    a = fit_offset_mean(Y, o, WeightColumns.from_sparse(scipy.sparse.csr_matrix(W)), **kw)
    b = fit_offset_mean(Y, o, dev, **kw)
    for name in ("coef", "se", "z", "score_z", "size"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(B.cupy_available(), reason="CuPy and a CUDA device are present")
def test_gpu_request_without_cuda_is_a_clear_error():
    counts, treatment, cov, _ = make_perturbation_screen(300, 2, 2, random_state=0)
    with pytest.raises(ValueError, match="CuPy and a CUDA device"):
        resampling_test(counts, treatment, cov, n_resamples=9, device="gpu")
    with pytest.raises(ValueError, match="device must be"):
        resampling_test(counts, treatment, cov, n_resamples=9, device="tpu")


@gpu
@needs_cuda
@pytest.mark.parametrize("kw", FITS)
@pytest.mark.parametrize("weights", ["none", "dense", "sparse"])
def test_negbinoffsetmean_cupy_equals_numpy(kw, weights):
    import cupy as cp
    import cupyx.scipy.sparse as csp

    o, Y, W = _data(seed=1)
    w_cpu = {"none": None, "dense": W, "sparse": scipy.sparse.csr_matrix(W)}[weights]
    w_gpu = {"none": None, "dense": cp.asarray(W), "sparse": csp.csr_matrix(cp.asarray(W))}[weights]
    cpu = NegBinOffsetMean(**kw).fit(o[:, None], Y, sample_weight=w_cpu)
    dev = NegBinOffsetMean(**kw).fit(cp.asarray(o[:, None]), cp.asarray(Y), sample_weight=w_gpu)
    assert B.get_namespace(dev.coef_) is cp
    for name in ("coef_", "coef_se_", "z_", "pvalue_", "score_z_", "size_"):
        np.testing.assert_allclose(B.to_host(getattr(dev, name)), getattr(cpu, name), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(B.to_host(dev.predict(cp.asarray(o[:, None]))), cpu.predict(o[:, None]), rtol=1e-9)


@gpu
@needs_cuda
@pytest.mark.parametrize("resampling", ["permutation", "conditional"])
@pytest.mark.parametrize("statistic", ["wald", "score"])
def test_resampling_test_on_gpu_equals_cpu(resampling, statistic):
    """Same draws (numpy generators on the host), sums on the GPU: the same statistics."""
    import cupy as cp

    # 12 genes x 3 perturbations: one perturbation block of 12 pairs, packs of small ones
    counts, treatment, cov, _ = make_perturbation_screen(3000, 12, 3, treated_fraction=0.05, random_state=2)
    pairs = [(g, p) for g in range(12) for p in range(3)] + [(0, 0)]
    kw = {"n_resamples": 99, "resampling": resampling, "statistic": statistic, "random_state": 4,
          "return_resampled": True, "pairs": pairs}
    cpu, S_cpu = resampling_test(counts, treatment, cov, **kw)
    dev, S_dev = resampling_test(counts, treatment, cov, device="gpu", **kw)
    np.testing.assert_allclose(S_dev, S_cpu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dev.pvalue, cpu.pvalue, rtol=1e-6)
    # CuPy counts select the GPU too
    again = resampling_test(cp.asarray(counts.to_numpy()), treatment.to_numpy(), cov.to_numpy(),
                            **{**kw, "pairs": [(g, p) for g, p in pairs], "return_resampled": False})
    np.testing.assert_allclose(again.statistic, cpu.statistic, rtol=1e-9)
