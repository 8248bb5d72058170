"""The SCEPTRE-style resampling test: building blocks against R and scipy, the
statistic against NegBinOffsetMean, the samplers' distributions, calibration on null
data and power on planted effects."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skmixed._families import NegativeBinomial
from skmixed.offset import (
    NegBinOffsetMean,
    conditional_resamples,
    distill,
    make_perturbation_screen,
    permutation_resamples,
    resampling_pvalues,
    resampling_test,
    skewnorm_moments,
    treatment_probabilities,
)
from skmixed.offset._engine import permutation_orderings
from skmixed.offset._checks import indicator_csc
from skmixed.offset._distill import _profile_size
from skmixed.offset._draws import binned_resamples, perturbation_rng

REF = Path(__file__).parent / "reference" / "offset"


# ------------------------------------------------------- building blocks vs R
@pytest.fixture(scope="module")
def ref_data():
    return pd.read_csv(REF / "data.csv"), pd.read_csv(REF / "distill.csv")


@pytest.mark.parametrize("response", ["y_nb", "y_low"])
def test_distillation_equals_glm_nb(ref_data, response):
    d, ref = ref_data
    for family, model in [("negative_binomial", "glm_nb"), ("poisson", "poisson")]:
        res = distill(d[[response]], d[["o"]], family=family)
        r = ref[(ref.response == response) & (ref.model == model)]
        np.testing.assert_allclose(res.coef[0], r.estimate, atol=1e-8)
        if model == "glm_nb":
            assert res.size[0] == pytest.approx(r.theta.iloc[0], rel=1e-6)
        else:
            assert res.size[0] == np.inf
        np.testing.assert_allclose(res.offsets[:, 0], res.coef[0, 0] + res.coef[0, 1] * d.o, rtol=1e-12)


def test_treatment_model_equals_glm_binomial(ref_data):
    d, ref = ref_data
    pi = treatment_probabilities(d[["w_treat"]], d[["o"]])
    r = ref[ref.model == "logistic"].estimate.to_numpy()
    np.testing.assert_allclose(pi[:, 0], scipy.special.expit(r[0] + r[1] * d.o), rtol=1e-9)


def test_table_size_derivatives_equal_the_family():
    """The distillation's size search sums per distinct count; the result is the ML size
    of the per-cell family derivatives."""
    rng = np.random.default_rng(0)
    n = 4000
    eta = rng.normal(0, 0.8, (n, 4)) + np.log([0.2, 2.0, 8.0, 1.0])
    r_true = np.array([0.6, 3.0, 20.0, 1e9])
    Y = rng.negative_binomial(r_true, r_true / (r_true + np.exp(eta))).astype(float)
    r = _profile_size(Y, eta, None)
    for g in range(3):
        fam = NegativeBinomial(r[g])
        score, _ = fam.size_derivatives(Y[:, g], np.exp(eta[:, g]))
        assert abs(np.sum(score)) < 1e-8 * n
        assert abs(np.log(r[g] / r_true[g])) < 0.3
    # Poisson data: no overdispersion, or a size so large it makes no difference
    assert r[3] > 1e3


# ------------------------------------------------------------- the statistic
@pytest.fixture(scope="module")
def small_screen():
    return make_perturbation_screen(1500, 4, 3, treated_fraction=0.1, random_state=2)


@pytest.mark.parametrize("family", ["negative_binomial", "poisson"])
def test_statistic_is_negbinoffsetmean_on_treated_cells(small_screen, family):
    counts, treatment, cov, _ = small_screen
    dist = distill(counts, cov, family=family)
    res = resampling_test(counts, treatment, cov, n_resamples=20, family=family, random_state=0)
    res_score = resampling_test(counts, treatment, cov, n_resamples=20, family=family, statistic="score", random_state=0)
    for row, srow in zip(res.itertuples(), res_score.itertuples()):
        g, p = counts.columns.get_loc(row.gene), treatment.columns.get_loc(row.perturbation)
        t = treatment.iloc[:, p].to_numpy()
        kw = {"family": "poisson"} if family == "poisson" else {"size": dist.size[g]}
        m = NegBinOffsetMean(**kw).fit(dist.offsets[t, g][:, None], counts.iloc[t, g])
        assert row.coef == pytest.approx(m.coef_, abs=1e-10)
        assert row.statistic == pytest.approx(m.z_, rel=1e-9)
        assert srow.statistic == pytest.approx(m.score_z_, rel=1e-9)
        assert row.n_treated == t.sum()


def _refit_z(dist, counts, g, cells):
    m = NegBinOffsetMean(size=dist.size[g]).fit(dist.offsets[cells, g][:, None], counts.iloc[cells, g])
    return m.z_


def test_resampled_statistics_are_refits(small_screen):
    """Each resampled statistic is the fit on that resample's treated cells, the
    resamples regenerated from the documented seeding (child ``p`` of
    ``SeedSequence(random_state)`` for perturbation ``p``, the last child for the
    permutations). Here 3 perturbations with 4 pairs each: they are packed into one
    block and share common random numbers."""
    counts, treatment, cov, _ = small_screen
    dist = distill(counts, cov)
    pi = treatment_probabilities(treatment, cov)
    res, S = resampling_test(counts, treatment, cov, n_resamples=30, distillation=dist, random_state=5,
                             return_resampled=True)
    again = resampling_test(counts, treatment, cov, n_resamples=30, distillation=dist, propensity=pi,
                            random_state=5)
    pd.testing.assert_frame_equal(res, again)
    seeds = np.random.SeedSequence(5).spawn(4)
    first = int(np.argmin(pi.mean(axis=0)))  # the pack is ordered by mean probability
    order, rows, cols, u = binned_resamples(pi.max(axis=1), 30, perturbation_rng(seeds[first]), uniforms=True)
    cells_all = order[rows]
    for k in (0, 5, 11):
        p = treatment.columns.get_loc(res.perturbation[k])
        g = counts.columns.get_loc(res.gene[k])
        keep = u < pi[cells_all, p]
        for b in (0, 7, 29):
            cells = cells_all[keep & (cols == b)]
            assert S[k, b] == pytest.approx(_refit_z(dist, counts, g, cells), rel=1e-9)


def test_large_perturbations_have_their_own_exact_resamples():
    """A perturbation with at least 8 pairs is a block of its own: its resamples are
    :func:`conditional_resamples` from its own seed, whatever else is tested."""
    counts, treatment, cov, _ = make_perturbation_screen(1200, 9, 2, treated_fraction=0.1, random_state=7)
    dist = distill(counts, cov)
    pi = treatment_probabilities(treatment, cov)
    res, S = resampling_test(counts, treatment, cov, n_resamples=20, distillation=dist, propensity=pi,
                             random_state=3, return_resampled=True)
    alone, S1 = resampling_test(counts, treatment.iloc[:, [1]], cov, n_resamples=20, distillation=dist,
                                propensity=pi[:, [1]], random_state=3, return_resampled=True)
    p = 1
    rng = perturbation_rng(np.random.SeedSequence(3).spawn(3)[p])
    rows, cols = conditional_resamples(pi[:, p], 20, rng)
    for k in np.flatnonzero((res.perturbation == "pert1").to_numpy())[:3]:
        g = counts.columns.get_loc(res.gene[k])
        for b in (0, 19):
            assert S[k, b] == pytest.approx(_refit_z(dist, counts, g, rows[cols == b]), rel=1e-9)


def test_permutation_statistics_are_refits_on_shared_orderings(small_screen):
    """Permutations: every pair uses the first k (its number of treated cells) cells of
    the same ordered resamples."""
    counts, treatment, cov, _ = small_screen
    dist = distill(counts, cov)
    res, S = resampling_test(counts, treatment, cov, n_resamples=25, distillation=dist, resampling="permutation",
                             random_state=9, return_resampled=True)
    k_max = int(res.n_treated.max())
    C = permutation_orderings(counts.shape[0], k_max, 25, perturbation_rng(np.random.SeedSequence(9).spawn(4)[3]))
    for k in (0, 6, 11):
        g = counts.columns.get_loc(res.gene[k])
        for b in (0, 24):
            cells = C[b, : res.n_treated[k]]
            assert S[k, b] == pytest.approx(_refit_z(dist, counts, g, cells), rel=1e-9)


@pytest.mark.parametrize("order", ["C", "F"])
def test_indicator_csc_equals_scipy(order):
    rng = np.random.default_rng(5)
    T = np.asarray(rng.uniform(size=(700, 13)) < 0.05, order=order)
    T[:, 4] = False  # an untreated perturbation
    A, ref = indicator_csc(T), scipy.sparse.csc_matrix(T)
    assert A.shape == ref.shape and (A != ref).nnz == 0
    np.testing.assert_array_equal(A.indptr, ref.indptr)
    np.testing.assert_array_equal(A.indices, ref.indices)


def test_simulated_screen_treats_the_requested_fraction():
    for fraction, confounding in [(0.01, 1.0), (0.05, 1.0), (0.2, 2.0)]:
        _, T, cov, _ = make_perturbation_screen(20_000, 1, 40, treated_fraction=fraction,
                                                confounding=confounding, random_state=0)
        # 800,000 Bernoulli draws: relative sampling SD at most 1.1%
        assert abs(T.to_numpy().mean() / fraction - 1.0) < 0.04
    with pytest.raises(ValueError, match="treated_fraction"):
        make_perturbation_screen(100, 1, 1, treated_fraction=0.0)


def test_permutation_orderings_are_prefix_stable_and_uniform():
    rng = np.random.default_rng
    a = permutation_orderings(50, 30, 400, rng(1))
    b = permutation_orderings(50, 12, 400, rng(1))
    np.testing.assert_array_equal(a[:, :12], b)
    assert all(np.unique(row).size == 30 for row in a)
    # every position holds every cell with probability 1/50
    freq = np.bincount(a[:, 5], minlength=50) / 400
    assert scipy.stats.chisquare(freq * 400).pvalue > 1e-3
    # the whole population: a permutation
    full = permutation_orderings(20, 20, 10, rng(2))
    assert all(np.array_equal(np.sort(row), np.arange(20)) for row in full)


# ---------------------------------------------------------------- samplers
def test_conditional_resamples_are_independent_bernoullis():
    pi = np.array([0.0, 1e-3, 0.02, 0.3, 0.5, 0.77, 1.0])
    B = 40_000
    rows, cols = conditional_resamples(pi, B, np.random.default_rng(0))
    assert len(set(zip(rows.tolist(), cols.tolist()))) == rows.size  # no (cell, resample) twice
    freq = np.bincount(rows, minlength=pi.size) / B
    se = np.sqrt(pi * (1 - pi) / B)
    assert np.all(np.abs(freq - pi) <= 5 * se + 1e-12)
    # cells are independent within a resample: the count per resample has the
    # Poisson-binomial variance
    per_b = np.bincount(cols, minlength=B)
    assert per_b.var() == pytest.approx(np.sum(pi * (1 - pi)), rel=0.05)
    both = np.zeros((pi.size, B), bool)
    both[rows, cols] = True
    assert abs(np.corrcoef(both[3], both[5])[0, 1]) < 0.02


def test_permutation_resamples_keep_the_count():
    treated = np.zeros(500, bool)
    treated[:37] = True
    rows, cols = permutation_resamples(treated, 200, np.random.default_rng(1))
    assert np.all(np.bincount(cols, minlength=200) == 37)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == rows.size
    freq = np.bincount(rows, minlength=500) / 200
    assert abs(freq.mean() - 37 / 500) < 1e-12


# ------------------------------------------------------------- p-values
def test_skewnorm_moments_recover_parameters():
    S = scipy.stats.skewnorm.rvs(4.0, loc=-1.0, scale=2.0, size=(3, 200_000), random_state=0)
    a, loc, scale = skewnorm_moments(S)
    np.testing.assert_allclose(a, 4.0, rtol=0.15)
    np.testing.assert_allclose(loc, -1.0, atol=0.03)
    np.testing.assert_allclose(scale, 2.0, rtol=0.02)


def test_pvalue_definitions():
    S = np.arange(1.0, 100.0)[None, :]  # 99 resamples 1..99
    out = resampling_pvalues(np.array([5.0]), S, "less")
    assert out.p_empirical[0] == pytest.approx(6 / 100)
    out = resampling_pvalues(np.array([5.0]), S, "greater")
    assert out.p_empirical[0] == pytest.approx(96 / 100)
    out = resampling_pvalues(np.array([5.0]), S)
    assert out.p_empirical[0] == pytest.approx(12 / 100)
    # normal resamples: the skew-normal p-value is the normal one
    Z = scipy.stats.norm.ppf((np.arange(2000) + 0.5) / 2000)[None, :]
    out = resampling_pvalues(np.array([-3.5]), Z)
    assert out.skewnorm_ok[0]
    assert out.p_skewnorm[0] == pytest.approx(2 * scipy.stats.norm.cdf(-3.5), rel=0.05)
    assert out.pvalue[0] == out.p_skewnorm[0] < out.p_empirical[0]
    # a non-finite resample (a boundary Wald statistic): empirical p-value only
    Z2 = Z.copy()
    Z2[0, 0] = -np.inf
    out = resampling_pvalues(np.array([-3.5]), Z2)
    assert not out.skewnorm_ok[0] and out.pvalue[0] == out.p_empirical[0]


# ----------------------------------------------- calibration and power
@pytest.fixture(scope="module")
def null_screen():
    """1,000 independent null pairs: gene k with perturbation k, confounded by the
    covariates (library size, batch drive both expression and treatment)."""
    K = 1000
    counts, treatment, cov, _ = make_perturbation_screen(2000, K, K, treated_fraction=0.05, random_state=1)
    pairs = np.column_stack([np.arange(K), np.arange(K)])
    return counts, treatment, cov, pairs, distill(counts, cov)


@pytest.mark.parametrize("statistic", ["wald", "score"])
def test_null_pvalues_are_uniform(null_screen, statistic):
    counts, treatment, cov, pairs, dist = null_screen
    res = resampling_test(counts, treatment, cov, pairs=pairs, n_resamples=199, statistic=statistic,
                          distillation=dist, random_state=0)
    assert len(res) == 1000
    for col in ("p_empirical", "pvalue"):
        ks = scipy.stats.kstest(res[col], "uniform")
        assert ks.pvalue > 0.01, (col, ks)
    print(f"\n{statistic}: skew-normal used for {res.skewnorm_ok.mean():.0%} of pairs; "
          f"rejections at 0.05: {(res.pvalue < 0.05).mean():.3f}")
    assert abs((res.pvalue < 0.05).mean() - 0.05) < 0.025


def test_permutation_is_calibrated_without_confounding():
    K = 300
    counts, treatment, cov, _ = make_perturbation_screen(1500, K, K, confounding=0.0, random_state=4)
    pairs = np.column_stack([np.arange(K), np.arange(K)])
    res = resampling_test(counts, treatment, cov, pairs=pairs, n_resamples=99, resampling="permutation",
                          random_state=0)
    assert scipy.stats.kstest(res.pvalue, "uniform").pvalue > 0.01


@pytest.mark.parametrize("statistic", ["wald", "score"])
def test_power_on_planted_effects(statistic):
    """Half of 200 pairs carry a knock-down (log fold change -0.2) on ~100 treated cells
    out of 2,000; the other half are null. Measured (seed 3, B = 199), at level 0.05,
    conditional resampling: Wald power 0.61 (type-I error 0.06), score power 0.62
    (type-I error 0.10, 10 of 100 null pairs); median estimate -0.179."""
    K = 200
    effects = {(k, k): -0.2 for k in range(0, K, 2)}
    counts, treatment, cov, truth = make_perturbation_screen(2000, K, K, effects=effects, random_state=3)
    pairs = np.column_stack([np.arange(K), np.arange(K)])
    res = resampling_test(counts, treatment, cov, pairs=pairs, n_resamples=199, statistic=statistic, random_state=0)
    planted = res.gene.isin(truth.gene).to_numpy()
    power = (res.pvalue[planted] < 0.05).mean()
    size = (res.pvalue[~planted] < 0.05).mean()
    print(f"\n{statistic}: power {power:.2f}, type-I error {size:.2f} at 0.05 ({planted.sum()} planted pairs)")
    assert power > 0.5
    assert size < 0.12
    assert np.median(res.coef[planted]) == pytest.approx(-0.2, abs=0.05)


# ------------------------------------------------------------------ bad input
def test_bad_input(small_screen):
    counts, treatment, cov, _ = small_screen
    with pytest.raises(ValueError, match="treatment must hold 0/1"):
        resampling_test(counts, treatment * 2, cov)
    with pytest.raises(ValueError, match="counts must be non-negative"):
        resampling_test(-counts, treatment, cov)
    with pytest.raises(ValueError, match="counts must be integers"):
        resampling_test(counts + 0.5, treatment, cov)
    with pytest.raises(ValueError, match="treatment has 10 rows"):
        resampling_test(counts, treatment.iloc[:10], cov)
    with pytest.raises(ValueError, match="covariates must be finite"):
        resampling_test(counts, treatment, cov.assign(batch=np.nan))
    with pytest.raises(ValueError, match="pairs names gene 'nope'"):
        resampling_test(counts, treatment, cov, pairs=[("nope", "pert0")])
    for kw, name in [({"resampling": "bootstrap"}, "resampling"), ({"statistic": "lr"}, "statistic"),
                     ({"alternative": "both"}, "alternative"), ({"n_resamples": 1}, "n_resamples"),
                     ({"family": "zinb"}, "family")]:
        with pytest.raises(ValueError, match=name):
            resampling_test(counts, treatment, cov, **kw)


def test_pairs_by_label_and_jobs_give_the_same_answer(small_screen):
    counts, treatment, cov, _ = small_screen
    pairs = [("gene1", "pert2"), ("gene3", "pert0"), ("gene0", "pert2")]
    a = resampling_test(counts, treatment, cov, pairs=pairs, n_resamples=50, random_state=11)
    b = resampling_test(counts, treatment, cov, pairs=[(1, 2), (3, 0), (0, 2)], n_resamples=50, random_state=11,
                        n_jobs=2)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.gene) == ["gene1", "gene3", "gene0"]


# ------------------------------------------- untestable pairs (issue 10, point 1)
@pytest.mark.parametrize("resampling", ["conditional", "permutation"])
@pytest.mark.parametrize("statistic", ["wald", "score"])
def test_pairs_without_treated_cells_get_nan_pvalues_and_a_flag(small_screen, resampling, statistic):
    """A perturbation with no treated cell (or fewer than ``min_treated``) has no test:
    NaN p-values and a flag, never the smallest p-value 2 / (B + 1)."""
    counts, treatment, cov, _ = small_screen
    T = treatment.copy()
    T["pert0"] = 0
    few = np.flatnonzero(T["pert1"].to_numpy())
    T["pert1"] = 0
    T.iloc[few[:3], T.columns.get_loc("pert1")] = 1  # 3 treated cells < min_treated = 7
    with pytest.warns(UserWarning, match="were not tested"):
        res = resampling_test(counts, T, cov, n_resamples=99, resampling=resampling, statistic=statistic,
                              random_state=0)
    none, low, ok = (res.perturbation == "pert0"), (res.perturbation == "pert1"), (res.perturbation == "pert2")
    assert (res.flag[none] == "no_treated_cells").all() and (res.flag[low] == "too_few_treated_cells").all()
    assert (res.flag[ok] == "").all()
    for col in ("p_empirical", "p_skewnorm", "pvalue"):
        assert res.loc[none | low, col].isna().all(), col
    assert res.loc[ok, "pvalue"].notna().all() and (res.loc[ok, "pvalue"] > 0).all()
    # a perturbation in every cell has no controls: not tested either
    T_all = T.copy()
    T_all["pert0"] = 1
    with pytest.warns(UserWarning, match="were not tested"):
        res_all = resampling_test(counts, T_all[["pert0", "pert2"]], cov, n_resamples=99, resampling=resampling,
                                  statistic=statistic, random_state=0)
    assert (res_all.flag[res_all.perturbation == "pert0"] == "no_control_cells").all()
    assert res_all.pvalue[res_all.perturbation == "pert0"].isna().all()
    # a lower min_treated tests the 3-cell perturbation
    res3 = resampling_test(counts, T[["pert1", "pert2"]], cov, n_resamples=99, resampling=resampling,
                           statistic=statistic, random_state=0, min_treated=3)
    assert (res3.flag == "").all() and res3.pvalue.notna().all()


def test_pvalues_of_undefined_and_boundary_statistics():
    """NaN observed: NaN p-values. NaN resamples (no treated cell): left out of the
    count. -inf observed (treated counts all zero): the most extreme value on the
    left, ties with -inf resamples counted as extreme, as documented."""
    S = np.arange(1.0, 100.0)[None, :]
    out = resampling_pvalues(np.array([np.nan]), S)
    assert np.isnan(out.p_empirical[0]) and np.isnan(out.pvalue[0])
    S_nan = np.concatenate([S, np.full((1, 50), np.nan)], axis=1)  # 99 defined of 149
    for alt in ("less", "greater", "two-sided"):
        a = resampling_pvalues(np.array([5.0]), S, alt).p_empirical[0]
        b = resampling_pvalues(np.array([5.0]), S_nan, alt).p_empirical[0]
        assert a == b, alt
    assert np.isnan(resampling_pvalues(np.array([1.0]), np.full((1, 9), np.nan)).pvalue[0])
    # observed -inf: with no -inf resample it is the most extreme (1 / (B + 1) on the left)
    out = resampling_pvalues(np.array([-np.inf]), S, "less")
    assert out.pvalue[0] == pytest.approx(1 / 100)
    S_tie = S.copy()
    S_tie[0, :9] = -np.inf  # 9 resamples with all treated counts zero too
    assert resampling_pvalues(np.array([-np.inf]), S_tie, "less").pvalue[0] == pytest.approx(10 / 100)
    assert resampling_pvalues(np.array([-np.inf]), S_tie).pvalue[0] == pytest.approx(20 / 100)
    assert resampling_pvalues(np.array([-np.inf]), S_tie, "greater").pvalue[0] == pytest.approx(1.0)


def test_all_zero_treated_counts_give_minus_inf_and_their_documented_pvalue(small_screen):
    counts, treatment, cov, _ = small_screen
    Y = counts.copy()
    t = treatment["pert0"].to_numpy().astype(bool)
    Y.loc[t, "gene0"] = 0
    res, S = resampling_test(Y, treatment, cov, pairs=[("gene0", "pert0")], n_resamples=99, random_state=0,
                             return_resampled=True)
    assert res.statistic[0] == -np.inf and res.flag[0] == ""
    n_tie = int(np.sum(S[0] == -np.inf))
    assert res.pvalue[0] == pytest.approx(min(1.0, 2 * (1 + n_tie) / 100))


def test_distillation_and_treatment_model_do_not_depend_on_threads(monkeypatch):
    """Chunks of genes / perturbations on 2 threads give the 1-thread results exactly."""
    import skmixed.offset._stream as S
    from skmixed.offset import (
        distill,
        make_perturbation_screen,
        treatment_probabilities,
    )

    counts, treatment, cov, _ = make_perturbation_screen(1500, 7, 5, treated_fraction=0.05, random_state=3)
    monkeypatch.setattr(S, "column_chunks", lambda k, n, budget=0: [slice(s, min(s + 2, k)) for s in range(0, k, 2)])
    d1, d2 = distill(counts, cov, n_jobs=1), distill(counts, cov, n_jobs=2)
    np.testing.assert_array_equal(d1.offsets, d2.offsets)
    np.testing.assert_array_equal(d1.size, d2.size)
    np.testing.assert_array_equal(d1.coef, d2.coef)
    whole = distill(counts.iloc[:, :2], cov)  # a chunk is fitted as if alone
    np.testing.assert_allclose(whole.coef, d2.coef[:2], rtol=1e-12)
    p1 = treatment_probabilities(treatment, cov, n_jobs=1)
    p2 = treatment_probabilities(treatment, cov, n_jobs=2)
    np.testing.assert_array_equal(p1, p2)


@pytest.mark.parametrize("statistic", ["score", "wald"])
def test_tiled_column_tables_equal_the_whole_array_formulas(statistic):
    """The per-cell tables built tile by tile are the whole-array formulas, bit for bit."""
    from skmixed.offset._engine import column_tables

    rng = np.random.default_rng(8)
    Gc, n = 5, 5000  # more than one tile, the last one partial
    Yt = rng.poisson(2.0, (Gc, n)).astype(float)
    Ot = rng.normal(0.0, 0.4, (Gc, n))
    phi = np.array([0.0, 0.5, 2.0, 0.1, 1e-3])
    shift = Ot.max(axis=1)
    cols = column_tables(Yt, Ot, shift, phi, statistic)
    if statistic == "score":
        mu0 = np.exp(Ot.T)
        d = 1.0 / (1.0 + phi[None, :] * mu0)
        want = np.hstack([(Yt.T - mu0) * d, mu0 * d])
    else:
        M = np.exp(Ot.T - shift[None, :])
        want = np.hstack([Yt.T, M])
        np.testing.assert_array_equal(cols.Q, 1.0 / M)
    np.testing.assert_array_equal(cols.X, want)
    rows = np.array([4, 1, 1])  # a block's genes read in place from the whole table
    sub = column_tables(Yt, Ot, shift[rows], phi[rows], statistic, rows=rows)
    np.testing.assert_array_equal(sub.X, column_tables(Yt[rows], Ot[rows], shift[rows], phi[rows], statistic).X)


# ------------------------------------------------- memory-bounded chunks (issues 14, 15)
@pytest.fixture(scope="module")
def chunk_screen():
    counts, treatment, cov, _ = make_perturbation_screen(1500, 12, 10, treated_fraction=0.05, random_state=4)
    rng = np.random.default_rng(2)
    # perturbations 0-2 with 8 pairs (blocks of their own), the others with 1-3 (packed)
    pairs = [(f"gene{g}", f"pert{p}") for p in range(10)
             for g in rng.choice(12, 8 if p < 3 else 1 + p % 3, replace=False)]
    return counts, treatment, cov, pairs


class _Budgets:
    """Chunks of ``genes`` genes / ``perts`` perturbations for the batched fits, and the
    read / round / observed-statistics budgets (values), set for a ``with`` block."""

    def __init__(self, genes=3, perts=4, read=None, round_=None, observed=None):
        import skmixed.offset._stream as S

        widths = {2**23: genes, 2**24: perts}
        self.new = {
            "column_chunks": lambda k, n, budget=2**23: [slice(s, min(s + widths[budget], k))
                                                         for s in range(0, k, widths[budget])],
            "READ_BUDGET": read or S.READ_BUDGET, "ROUND_BUDGET": round_ or S.ROUND_BUDGET,
            "OBSERVED_BUDGET": observed or S.OBSERVED_BUDGET}
        self.S = S

    def __enter__(self):
        self.old = {k: getattr(self.S, k) for k in self.new}
        for k, v in self.new.items():
            setattr(self.S, k, v)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            setattr(self.S, k, v)


_CHUNK_REFS = {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(read=st.integers(1, 6), round_=st.integers(1, 4), observed=st.sampled_from([1, 50, 700, 10**9]),
       n_jobs=st.sampled_from([1, 2]), resampling=st.sampled_from(["conditional", "permutation"]),
       statistic=st.sampled_from(["wald", "score"]))
def test_chunk_budgets_and_jobs_do_not_change_results(chunk_screen, read, round_, observed, n_jobs, resampling,
                                                      statistic):
    """Genes read and distilled by 1-6 chunks at a time, treatment models fitted by 1-4
    chunks a round (a round's pairs tested before the next is fitted), the observed
    statistics by runs of 1 to all treated cells, on 1 or 2 threads: the results and the
    resampled statistics are those of one pass over everything, to the last digit."""
    counts, treatment, cov, pairs = chunk_screen
    n = counts.shape[0]
    kw = dict(pairs=pairs, n_resamples=19, resampling=resampling, statistic=statistic, random_state=7,
              return_resampled=True)
    key = (resampling, statistic)
    if key not in _CHUNK_REFS:
        with _Budgets(read=10**9, round_=10**9, observed=10**9):
            _CHUNK_REFS[key] = resampling_test(counts, treatment, cov, **kw)
    ref, ref_S = _CHUNK_REFS[key]
    with _Budgets(read=read * 3 * n, round_=round_ * 4 * n, observed=observed):
        res, S = resampling_test(counts, treatment, cov, n_jobs=n_jobs, **kw)
    pd.testing.assert_frame_equal(res, ref, check_exact=True)
    np.testing.assert_array_equal(S, ref_S)


def test_probabilities_are_fitted_round_by_round_and_equal_the_whole_fit(chunk_screen, monkeypatch):
    """The treatment models run a round of perturbations at a time (the probability
    matrix never exists whole), and give the probabilities of treatment_probabilities:
    passing those as ``propensity`` changes nothing."""
    import skmixed.offset._stream as S

    counts, treatment, cov, pairs = chunk_screen
    n = counts.shape[0]
    widths = []
    original = S.treatment_chunks

    def spy(T, X, cols=None, **kw):
        widths.append(len(cols))
        return original(T, X, cols, **kw)

    kw = dict(pairs=pairs, n_resamples=19, random_state=1, return_resampled=True)
    with _Budgets(round_=4 * n):
        monkeypatch.setattr(S, "treatment_chunks", spy)
        res, draws = resampling_test(counts, treatment, cov, **kw)
        monkeypatch.setattr(S, "treatment_chunks", original)
        pi = treatment_probabilities(treatment, cov)
        given, given_draws = resampling_test(counts, treatment, cov, propensity=pi, **kw)
    assert widths == [4, 4, 2]
    pd.testing.assert_frame_equal(res, given, check_exact=True)
    np.testing.assert_array_equal(draws, given_draws)


def test_backed_counts_are_read_by_chunks_of_genes(chunk_screen, tmp_path, monkeypatch):
    """From a backed AnnData the genes in pairs are read a chunk at a time (each read
    at most the chunk; every gene once), with the in-memory results."""
    anndata = pytest.importorskip("anndata")
    from skmixed._inputs import MatrixReader

    counts, treatment, cov, pairs = chunk_screen
    n = counts.shape[0]
    path = _write_h5ad(counts, cov, tmp_path / "screen.h5ad")
    kw = dict(pairs=pairs, n_resamples=19, random_state=0, return_resampled=True)
    reads = []
    original = MatrixReader.columns

    def spy(self, sel):
        reads.append(np.asarray(sel))
        return original(self, sel)

    with _Budgets(genes=2, read=4 * n):
        ref, ref_draws = resampling_test(counts, treatment, cov, **kw)
        monkeypatch.setattr(MatrixReader, "columns", spy)
        res, draws = resampling_test(anndata.read_h5ad(path, backed="r"), treatment, cov, **kw)
    used = sorted({int(g[4:]) for g, _ in pairs})
    assert len(reads) == -(-len(used) // 4) and max(r.size for r in reads) == 4
    assert list(np.concatenate(reads)) == used
    pd.testing.assert_frame_equal(res, ref, check_exact=True)
    np.testing.assert_array_equal(draws, ref_draws)


def test_simulated_screen_is_drawn_by_blocks_of_cells_as_one_draw(monkeypatch):
    """Blocks of cells (a few cells or all) give the same screen to the last digit."""
    import skmixed.offset._simulate as M

    kw = dict(treated_fraction=0.1, effects={(1, 2): 1.0, (1, 0): -0.5, (3, 2): 0.3}, random_state=5)
    whole = make_perturbation_screen(700, 6, 4, **kw)
    monkeypatch.setattr(M, "_BLOCK", 37)  # 6 cells a block, the last one partial
    blocks = make_perturbation_screen(700, 6, 4, **kw)
    for a, b in zip(whole, blocks):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert whole[1].to_numpy().any() and (whole[0].to_numpy() > 0).any()


@pytest.fixture(scope="module")
def backed_screen(chunk_screen, tmp_path_factory):
    pytest.importorskip("anndata")
    counts, _, cov, _ = chunk_screen
    return _write_h5ad(counts, cov, tmp_path_factory.mktemp("backed") / "screen.h5ad")


def _write_h5ad(counts, cov, path):
    """The counts as a CSC (column-major: gene chunks read fast) ``.h5ad`` file."""
    import anndata

    anndata.AnnData(scipy.sparse.csc_matrix(counts.to_numpy(dtype=float)),
                    obs=cov.set_axis([f"c{i}" for i in range(counts.shape[0])]),
                    var=pd.DataFrame(index=counts.columns)).write_h5ad(path)
    return path


def test_backed_resampling_holds_one_chunk_of_genes_at_a_time(tmp_path, monkeypatch):
    """Cis pairs (each perturbation's 8 neighbouring genes, genes in order) from a
    backed AnnData read by chunks of 4 genes: every read is at most the chunk, and the
    blocks of pairs run on the chunk's gene rows plus those carried for the blocks that
    straddle a chunk boundary, never on every gene; the results and resampled statistics
    are the in-memory ones to the last digit."""
    anndata = pytest.importorskip("anndata")
    import skmixed.offset._blocks as R
    from skmixed._inputs import MatrixReader

    counts, treatment, cov, _ = make_perturbation_screen(1200, 24, 6, treated_fraction=0.06, random_state=8)
    n = counts.shape[0]
    pairs = [(f"gene{g}", f"pert{p}") for p in range(6) for g in range(3 * p, 3 * p + 8)]
    path = _write_h5ad(counts, cov, tmp_path / "cis.h5ad")
    reads, resident = [], []
    read, run_block = MatrixReader.columns, R.run_block

    def spy_read(self, sel):
        reads.append(len(sel))
        return read(self, sel)

    def spy_block(Yt, Ot, *args):
        resident.append((Yt.shape[0], Ot.shape[0]))
        return run_block(Yt, Ot, *args)

    for statistic in ("wald", "score"):
        kw = dict(pairs=pairs, n_resamples=19, statistic=statistic, random_state=2, return_resampled=True)
        reads.clear()
        resident.clear()
        with _Budgets(genes=2, read=4 * n):
            ref, ref_draws = resampling_test(counts, treatment, cov, **kw)
            monkeypatch.setattr(MatrixReader, "columns", spy_read)
            monkeypatch.setattr(R, "run_block", spy_block)
            res, draws = resampling_test(anndata.read_h5ad(path, backed="r"), treatment, cov, **kw)
            monkeypatch.undo()
        used = len({g for g, _ in pairs})  # 23 genes, read 4 at a time
        assert reads == [4] * 5 + [3]
        assert len(resident) == 6  # one block per perturbation
        # a block's 8 genes span 2 or 3 chunks: at most 4 fresh rows + 7 carried
        assert max(max(r) for r in resident) <= 4 + 7 < used
        pd.testing.assert_frame_equal(res, ref, check_exact=True)
        np.testing.assert_array_equal(draws, ref_draws)


@pytest.mark.parametrize(("read", "n_jobs", "statistic", "family", "given"), [
    (1, 1, "wald", "negative_binomial", False), (2, 2, "wald", "negative_binomial", True),
    (3, 1, "score", "negative_binomial", False), (1, 2, "wald", "poisson", False),
    (2, 1, "wald", "no_overdispersion", False)])
def test_backed_gene_chunks_do_not_change_results(chunk_screen, backed_screen, monkeypatch, read, n_jobs, statistic,
                                                   family, given):
    """Pairs spread over the genes (blocks straddling chunks, packs of small
    perturbations run in the chunk of their last gene), given or fitted propensities,
    and NB sizes all infinite (every pair's Wald information then takes the Poisson
    formula): the backed results equal the in-memory ones to the last digit."""
    anndata = pytest.importorskip("anndata")
    import skmixed.offset._distill as R

    counts, treatment, cov, pairs = chunk_screen
    n = counts.shape[0]
    if family == "no_overdispersion":
        monkeypatch.setattr(R, "_profile_size", lambda Y, eta, r0, max_iter=100: np.full(Y.shape[1], np.inf))
        family = "negative_binomial"
    kw = dict(pairs=pairs, n_resamples=19, statistic=statistic, family=family, random_state=5, return_resampled=True,
              propensity=treatment_probabilities(treatment, cov) if given else None)
    with _Budgets(genes=1, read=read * n):
        ref, ref_draws = resampling_test(counts, treatment, cov, **kw)
        res, draws = resampling_test(anndata.read_h5ad(backed_screen, backed="r"), treatment, cov, n_jobs=n_jobs,
                                     **kw)
    assert np.isfinite(ref["statistic"]).sum() > 20
    pd.testing.assert_frame_equal(res, ref, check_exact=True)
    np.testing.assert_array_equal(draws, ref_draws)
