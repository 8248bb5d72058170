"""The CuPy code paths, run on the CPU through the numpy-backed stand-in
(tests/_cupy_standin.py, installed by the ``fake_cupy`` fixture of conftest.py).

The real GPU tests (``@pytest.mark.gpu``, skipped without CUDA) are called here with the
stand-in as ``cupy``, on the same or smaller data and to their own tolerances, so that
a numpy or scipy call on a device array, or a host array mixed into device arithmetic,
fails on every machine. The stand-in cannot measure speed or catch CUDA kernel bugs:
``asv_bench/gpu_check.py`` on a real GPU still does that.
"""

import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.special
import test_backend
import test_eiv_gpu
import test_glmm_many
import test_offset_gpu
import test_zinb_estimator
from sklearn.exceptions import ConvergenceWarning

from skmixed import NegativeBinomialGLMM, PoissonGLMM, ZINBWaVE
from skmixed import _backend as B
from skmixed.datasets import make_zeb2_like, make_zinb_counts
from skmixed.offset import NegBinOffsetMean, make_perturbation_screen, resampling_test


# ------------------------------------------------------------------ the stand-in itself
def test_standin_refuses_what_cupy_refuses(fake_cupy):
    cp = fake_cupy
    import cupyx.scipy.sparse as csp

    a = cp.asarray(np.arange(6.0).reshape(3, 2))
    assert B.cupy_available() and B.get_namespace(a) is cp and not isinstance(a, np.ndarray)
    host = np.ones((3, 2))
    refused = {
        "np.asarray": lambda: np.asarray(a),
        "device + host": lambda: a + host,
        "host + device": lambda: host + a,
        "host 0-d array": lambda: a * np.array(2.0),
        "cupy function, host argument": lambda: cp.where(a > 1, a, host),
        "scipy.special on device": lambda: scipy.special.gammaln(a),
        "scipy.linalg on device": lambda: scipy.linalg.cholesky(cp.eye(2)),
        "ufunc method": lambda: np.add.at(a, [0], 1.0),
        "host array into a slice": lambda: a.__setitem__(slice(None), host),
        "pandas": lambda: pd.Series(a[:, 0]),
        "scipy.sparse of device": lambda: sp.csr_matrix(a),
        "device sparse @ host": lambda: csp.csr_matrix(a) @ np.ones(2),
        "cupy.repeat by an array": lambda: cp.repeat(a, cp.asarray([1, 2, 3]), axis=0),
    }
    for what, f in refused.items():
        with pytest.raises((TypeError, ValueError)):
            f()
            pytest.fail(f"the stand-in accepted {what}")


def test_standin_results_stay_on_the_device(fake_cupy):
    cp = fake_cupy
    import cupyx
    import cupyx.scipy.sparse as csp
    import cupyx.scipy.special

    x = np.linspace(0.5, 3.0, 6)
    a = cp.asarray(x)
    for out, expected in [
        (np.exp(a) + 1.0, np.exp(x) + 1.0),  # ufunc and operator
        (np.sum(a), np.sum(x)),  # __array_function__ -> cupy.sum: a 0-d device array
        (a[2], x[2]),  # scalar indexing too
        (a * np.float64(2.0), 2 * x),  # numpy scalars are fine
        (cupyx.scipy.special.gammaln(a), scipy.special.gammaln(x)),
        (np.linalg.solve(cp.eye(6) * 2.0, a), x / 2),
        (np.zeros(3, like=a), np.zeros(3)),  # NEP 35 creation
    ]:
        assert isinstance(out, cp.ndarray)
        np.testing.assert_allclose(out.get(), expected, rtol=1e-15)
    acc = cp.zeros(2)
    cupyx.scatter_add(acc, cp.asarray([0, 1, 1]), cp.asarray([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(cp.asnumpy(acc), [1.0, 5.0])
    H = sp.random(5, 4, density=0.5, random_state=0, format="csr")
    D = csp.csr_matrix(H)
    assert type(D).__module__.startswith("cupyx.scipy.sparse") and not sp.issparse(D) and csp.issparse(D)
    assert isinstance(D.data, cp.ndarray) and isinstance(D.get(), sp.csr_matrix)
    np.testing.assert_allclose((D @ cp.ones(4)).get(), H @ np.ones(4))
    np.testing.assert_allclose(D.sum(axis=0).get(), np.asarray(H.sum(axis=0)))
    np.testing.assert_allclose(D.tocsc().T.multiply(cp.asarray(H.T.toarray())).get().toarray(), H.T.multiply(H.T).toarray())


def test_backend_helpers_on_the_device_equal_numpy(fake_cupy):
    """Every helper of skmixed._backend through its cupy branch."""
    cp = fake_cupy
    rng = np.random.default_rng(0)
    v = rng.normal(size=(7, 3))
    codes = np.array([0, 2, 2, 1, 0, 3, 3])
    pd_mat = v.T @ v + np.eye(3)
    x = rng.uniform(0.2, 5.0, 9)
    W = sp.random(6, 5, density=0.4, random_state=1, format="csc")
    on = {"dev": cp.asarray, "host": np.asarray}
    res = {}
    for where, to in on.items():
        L = B.cholesky(to(pd_mat))
        res[where] = [
            B.segment_sum(to(v), to(codes), 4), B.segment_sum(to(v[:, 0]), to(codes), 4),
            L, B.cho_solve(L, to(v[:3, 0])), B.solve_triangular(L, to(v[:3]), trans=True),
            B.logsumexp(to(v), axis=0), B.logsumexp(to(v)), B.safe_exp(to(v * 400)), B.softplus(to(v * 50)),
            B.gammaln(to(x)), B.xlogy(to(x), to(x)), B.expit(to(v)), B.digamma(to(x)), B.ndtr(to(v)),
            B.csc_matmul(to(W.data), to(W.indices), to(W.indptr), W.shape, to(v[:5])),
            B.csc_matmul(None, to(W.indices), to(W.indptr), W.shape, to(v[:5, 0])),
            B.add_rows_at(to(np.zeros((4, 3))), to(codes), to(v)), B.add_rows_at(to(np.zeros(4)), to(codes), to(v[:, 1])),
            *B.nonzero_entries(to(W.toarray())),
            B.sparse_csr(to(v[:, 0]), to(codes), to(np.arange(7)), (4, 7), cp if where == "dev" else np).toarray(),
        ]
        if where == "dev":
            dev_sparse = cp.asarray(W.toarray())
            import cupyx.scipy.sparse as csp

            res["dev"] += list(B.nonzero_entries(csp.csr_matrix(dev_sparse)))
            assert B.is_device_sparse(csp.csr_matrix(dev_sparse)) and B.gpu_namespace() is cp
        else:
            res["host"] += list(B.nonzero_entries(sp.csr_matrix(W.toarray())))
    for d, h in zip(res["dev"], res["host"], strict=True):
        assert isinstance(d, cp.ndarray), type(d)
        np.testing.assert_allclose(B.to_host(d), h, rtol=1e-12, atol=1e-300)
    with pytest.raises(np.linalg.LinAlgError):
        B.cholesky(cp.asarray([[1.0, 2.0], [2.0, 1.0]]))


# ------------------------------------------------------------------ the real GPU tests
def test_glm_and_family_kernels(fake_cupy):
    test_backend.test_glm_cupy_equals_numpy()
    test_backend.test_family_kernels_cupy_equal_numpy()


@pytest.mark.parametrize("kw", test_offset_gpu.FITS)
@pytest.mark.parametrize("weights", ["none", "dense", "sparse"])
def test_negbinoffsetmean(fake_cupy, kw, weights):
    test_offset_gpu.test_negbinoffsetmean_cupy_equals_numpy(kw, weights)


@pytest.mark.parametrize("resampling", ["permutation", "conditional"])
@pytest.mark.parametrize("statistic", ["wald", "score"])
def test_resampling_test(fake_cupy, resampling, statistic):
    test_offset_gpu.test_resampling_test_on_gpu_equals_cpu(resampling, statistic)


@pytest.mark.parametrize("family", ["poisson", "negative_binomial"])
@pytest.mark.parametrize("init", ["accelerated", "random"])
def test_glmeiv(fake_cupy, family, init):
    test_eiv_gpu.test_gpu_fit_equals_cpu_fit(family, init)


def test_zinbwave(fake_cupy):
    # smaller than the GPU test's data: each stand-in operation costs a Python call
    sim = make_zinb_counts(150, 60, n_clusters=3, n_batches=2, n_latent=3, batch_sd=0.8, cluster_sep=2.0, random_state=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        test_zinb_estimator.test_cupy_matches_numpy(sim)


def test_zinbwave_methods_on_device_counts(fake_cupy):
    """Beyond the GPU test's fit: transform, mu, pi, impute, weights, residuals, loglik and
    score on cupyx sparse counts, with the gene covariates and offset on the device too."""
    import cupyx.scipy.sparse as csp

    sim = make_zinb_counts(100, 30, n_clusters=3, n_latent=2, random_state=3)
    V, off = np.ones((30, 1)), np.zeros((100, 30))
    dev_Y = csp.csr_matrix(sim.counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cpu = ZINBWaVE(2, random_state=0, max_iter=3).fit(sim.counts, gene_covariates=V, offset=off)
        gpu = ZINBWaVE(2, random_state=0, max_iter=3).fit(
            dev_Y, gene_covariates=fake_cupy.asarray(V), offset=fake_cupy.asarray(off)
        )
    assert gpu.penalized_loglik_ == pytest.approx(cpu.penalized_loglik_, rel=1e-8)
    for name in ("transform", "mu", "pi", "impute", "observational_weights", "deviance_residuals", "loglik"):
        d, h = getattr(gpu, name)(dev_Y), getattr(cpu, name)(sim.counts)
        assert isinstance(d, fake_cupy.ndarray), name
        np.testing.assert_allclose(d.get(), h, rtol=1e-6, atol=1e-8, err_msg=name)
    assert gpu.score(dev_Y) == pytest.approx(cpu.score(sim.counts), rel=1e-8)


def test_resampling_test_device_sparse_counts(fake_cupy):
    """cupyx sparse counts and CuPy covariates select the GPU: the CPU statistics."""
    import cupyx.scipy.sparse as csp

    counts, treatment, cov, _ = make_perturbation_screen(600, 4, 2, treated_fraction=0.1, random_state=2)
    kw = {"n_resamples": 19, "random_state": 0, "return_resampled": True}
    cpu, S_cpu = resampling_test(counts, treatment, cov, **kw)
    C = fake_cupy.asarray(counts.to_numpy(dtype=float))
    dev, S_dev = resampling_test(
        csp.csr_matrix(C), fake_cupy.asarray(treatment.to_numpy(dtype=float)), fake_cupy.asarray(cov.to_numpy()), **kw
    )
    np.testing.assert_allclose(S_dev, S_cpu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dev.statistic, cpu.statistic, rtol=1e-9)
    np.testing.assert_allclose(dev.pvalue, cpu.pvalue, rtol=1e-6)


def test_negbinoffsetmean_one_gene_predict_and_score(fake_cupy):
    rng = np.random.default_rng(3)
    o = rng.normal(0, 0.5, (400, 1))
    y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.3 + o[:, 0]))).astype(float)
    cpu = NegBinOffsetMean().fit(o, y)
    gpu = NegBinOffsetMean().fit(fake_cupy.asarray(o), fake_cupy.asarray(y))
    np.testing.assert_allclose(B.to_host(gpu.coef_), cpu.coef_, rtol=1e-9)
    np.testing.assert_allclose(B.to_host(gpu.predict(fake_cupy.asarray(o))), cpu.predict(o), rtol=1e-9)
    assert gpu.score(fake_cupy.asarray(o), fake_cupy.asarray(y)) == pytest.approx(cpu.score(o, y), rel=1e-9)


@pytest.fixture(scope="module")
def genes():
    """A smaller version of test_glmm_many's data (1,500 cells, 6 genes, one without counts)."""
    d = make_zeb2_like(1500, random_state=4)
    rng = np.random.default_rng(1)
    X = pd.get_dummies(d.cell_group, prefix="cell_group", prefix_sep="", dtype=float)
    lt = np.log(d.total_count.to_numpy())
    pat = pd.factorize(d.patient_assignment, sort=True)[0]
    grp = d.cell_group.cat.codes.to_numpy()
    eta = [rng.normal(-6, 1) + rng.normal(0, 0.3, 20)[grp] + rng.normal(0, 0.25, 16)[pat] + lt for _ in range(6)]
    Y = rng.poisson(np.exp(np.stack(eta, axis=1))).astype(float)
    Y[:, 3] = 0
    return d, X, Y, lt


def test_poissonglmm_many_genes(fake_cupy, genes):
    test_glmm_many.test_many_genes_on_gpu_equal_cpu(genes)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_poissonglmm_many_genes_device_sparse(fake_cupy, genes, reml, fmt):
    """cupyx sparse counts (each format), REML and ML: the GPU test's tolerances."""
    import cupyx.scipy.sparse as csp

    d, X, Y, lt = genes
    kw = {"groups": d.patient_assignment, "offset": lt}
    cpu = PoissonGLMM(fit_intercept=False, reml=reml).fit(X, sp.csc_matrix(Y), **kw)
    dev_counts = getattr(csp, f"{fmt}_matrix")(fake_cupy.asarray(Y))
    gpu = PoissonGLMM(fit_intercept=False, reml=reml).fit(X, dev_counts, **kw)
    assert np.isnan(gpu.coef_[3]).all()  # the gene without counts
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, atol=1e-8, equal_nan=True)
    np.testing.assert_allclose(gpu.coef_se_, cpu.coef_se_, rtol=1e-7, equal_nan=True)
    np.testing.assert_allclose(gpu.theta_, cpu.theta_, rtol=1e-6, atol=1e-8, equal_nan=True)


@pytest.mark.parametrize("model", [PoissonGLMM, NegativeBinomialGLMM])
def test_glmm_single_gene_device_response(fake_cupy, model):
    """A 1-D CuPy response (one gene) is fitted on the host, as the numpy one (it raised
    numpy's implicit-conversion TypeError)."""
    rng = np.random.default_rng(0)
    g = rng.integers(0, 10, 300)
    x = rng.normal(size=300)
    mu = np.exp(0.5 + 0.3 * x + rng.normal(0, 0.5, 10)[g])
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)
    cpu = model().fit(x[:, None], y, groups=g)
    gpu = model().fit(fake_cupy.asarray(x[:, None]), fake_cupy.asarray(y), groups=g)
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, rtol=1e-12)
    np.testing.assert_allclose(gpu.coef_se_, cpu.coef_se_, rtol=1e-12)


def test_nbglmm_many_genes_device_counts(fake_cupy, genes):
    """NegativeBinomialGLMM has no GPU path: device counts (dense or sparse) are fitted on
    the host, as the numpy ones."""
    import cupyx.scipy.sparse as csp

    d, X, _, lt = genes
    rng = np.random.default_rng(2)
    pat = pd.factorize(d.patient_assignment, sort=True)[0]
    mu = np.exp(rng.normal(-6, 0.5, (1, 3)) + rng.normal(0, 0.25, (16, 3))[pat] + lt[:, None])
    Y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(float)
    kw = {"groups": d.patient_assignment, "offset": lt}
    cpu = NegativeBinomialGLMM(fit_intercept=False).fit(X, Y, **kw)
    assert cpu.genes_.converged.all()
    for dev in (fake_cupy.asarray(Y), csp.csr_matrix(fake_cupy.asarray(Y))):
        gpu = NegativeBinomialGLMM(fit_intercept=False).fit(X, dev, **kw)
        np.testing.assert_allclose(gpu.coef_, cpu.coef_, rtol=1e-10, equal_nan=True)
        np.testing.assert_allclose(gpu.genes_["size"], cpu.genes_["size"], rtol=1e-10)


def test_the_standin_is_gone_after_its_tests():
    """Runs last (file order): after the stand-in's tests the backend sees this machine's real CuPy or none."""
    assert not getattr(sys.modules.get("cupy"), "is_standin", False)
    cp = B._cupy()
    assert cp is None or not getattr(cp, "is_standin", False)
    assert B.get_namespace(np.ones(2)) is np
