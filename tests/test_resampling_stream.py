"""resampling_test from data on disk (issue 15): permutations and a given
``distillation=`` streamed by chunks of genes (results to the last digit of the
in-memory call, the reader never holding more than a chunk of genes), and genes
without counts flagged on every path."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_offset_resampling import _Budgets, _write_h5ad

from skmixed.offset import distill, make_perturbation_screen, resampling_test

anndata = pytest.importorskip("anndata")

import skmixed.offset._blocks as blocks_module  # noqa: E402 (after the anndata skip)
from skmixed._inputs import MatrixReader  # noqa: E402

N_CELLS = 1200
# each perturbation's 8 neighbouring genes: 23 genes, read 4 at a time
CIS = [(f"gene{g}", f"pert{p}") for p in range(6) for g in range(3 * p, 3 * p + 8)]


@pytest.fixture(scope="module")
def cis_screen(tmp_path_factory):
    counts, treatment, cov, _ = make_perturbation_screen(N_CELLS, 24, 6, treated_fraction=0.06, random_state=8)
    path = _write_h5ad(counts, cov, tmp_path_factory.mktemp("stream") / "cis.h5ad")
    return counts, treatment, cov, path


class _Spy:
    """Records the columns each read asks for and the gene rows each block runs on."""

    def __init__(self, monkeypatch):
        self.reads, self.rows = [], []
        read, run_block = MatrixReader.columns, blocks_module.run_block

        def spy_read(reader, sel):
            self.reads.append(len(sel))
            return read(reader, sel)

        def spy_block(Yt, Ot, *args):
            self.rows.append(max(Yt.shape[0], Ot.shape[0]))
            return run_block(Yt, Ot, *args)

        monkeypatch.setattr(MatrixReader, "columns", spy_read)
        monkeypatch.setattr(blocks_module, "run_block", spy_block)


def _backed(path):
    return anndata.read_h5ad(path, backed="r")


@pytest.mark.parametrize(("statistic", "family", "n_jobs"), [
    ("wald", "negative_binomial", 1), ("score", "negative_binomial", 2), ("wald", "poisson", 2)])
def test_backed_permutations_hold_one_chunk_of_genes_at_a_time(cis_screen, monkeypatch, statistic, family, n_jobs):
    """Permutation blocks group pairs by their number of treated cells, across the
    whole matrix; streamed, each chunk's pairs are blocked and run in that chunk: every
    read is at most the chunk (each gene read once), every block runs on the chunk's
    rows only (nothing carried), and the results and resampled statistics are the
    in-memory ones to the last digit."""
    counts, treatment, cov, path = cis_screen
    kw = dict(pairs=CIS, n_resamples=19, resampling="permutation", statistic=statistic, family=family,
              random_state=2, return_resampled=True)
    with _Budgets(genes=2, read=4 * N_CELLS):
        ref, ref_draws = resampling_test(counts, treatment, cov, **kw)
        spy = _Spy(monkeypatch)
        res, draws = resampling_test(_backed(path), treatment, cov, n_jobs=n_jobs, **kw)
        monkeypatch.undo()
    assert spy.reads == [4] * 5 + [3]
    assert len(spy.rows) >= 6 and max(spy.rows) <= 4
    assert np.isfinite(ref["pvalue"]).all()
    pd.testing.assert_frame_equal(res, ref, check_exact=True)
    np.testing.assert_array_equal(draws, ref_draws)


@pytest.mark.parametrize("resampling", ["conditional", "permutation"])
def test_backed_with_a_given_distillation_reads_counts_by_chunks(cis_screen, monkeypatch, resampling):
    """A precomputed distillation holds the offsets; the counts are still needed (the
    statistics are sums of counts over treated cells) and are read a chunk of genes at
    a time; the results are those of the in-memory call with the same distillation."""
    counts, treatment, cov, path = cis_screen
    dist = distill(counts, cov)
    kw = dict(pairs=CIS, n_resamples=19, resampling=resampling, distillation=dist, random_state=4,
              return_resampled=True)
    with _Budgets(genes=2, read=4 * N_CELLS):
        ref, ref_draws = resampling_test(counts, treatment, cov, **kw)
        spy = _Spy(monkeypatch)
        res, draws = resampling_test(_backed(path), treatment, cov, **kw)
        monkeypatch.undo()
    assert spy.reads == [4] * 5 + [3]
    # conditional blocks straddling chunks carry at most 7 rows; permutations none
    assert max(spy.rows) <= (4 if resampling == "permutation" else 11) < 23
    pd.testing.assert_frame_equal(res, ref, check_exact=True)
    np.testing.assert_array_equal(draws, ref_draws)
    np.testing.assert_array_equal(res["size"], dist.size[[int(g[4:]) for g in res.gene]])


@pytest.fixture(scope="module")
def cis_distillation(cis_screen):
    counts, _, cov, _ = cis_screen
    return distill(counts, cov)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.lists(st.booleans(), min_size=len(CIS), max_size=len(CIS)), seed=st.integers(0, 2**16),
       statistic=st.sampled_from(["wald", "score"]))
def test_a_pairs_permutation_statistics_do_not_depend_on_the_other_pairs(cis_screen, cis_distillation, keep,
                                                                             seed, statistic):
    """With the offsets fixed (a given distillation), a pair's permutation draws and
    statistics are the same to the last digit whichever other pairs are tested, in
    whatever order: its block-mates, the largest number of treated cells and the
    chunks do not enter its arithmetic (what makes the streamed path exact)."""
    counts, treatment, cov, _ = cis_screen
    if not any(keep):
        keep = [True] + keep[1:]
    kw = dict(n_resamples=19, resampling="permutation", statistic=statistic, distillation=cis_distillation,
              random_state=seed,
              return_resampled=True)
    full, S = resampling_test(counts, treatment, cov, pairs=CIS, **kw)
    sub = np.flatnonzero(keep)[::-1]  # reversed: row order does not matter either
    part, S_part = resampling_test(counts, treatment, cov, pairs=[CIS[i] for i in sub], **kw)
    pd.testing.assert_frame_equal(part, full.iloc[sub].reset_index(drop=True), check_exact=True)
    np.testing.assert_array_equal(S_part, S[sub])


# --------------------------------------------------------------- degenerate pairs
@pytest.fixture(scope="module")
def degenerate(tmp_path_factory):
    """A gene without counts (gene3), a perturbation with no treated cell (pert3), one
    with 3 (pert4) and one in every cell (pert5), beside ordinary pairs."""
    counts, treatment, cov, _ = make_perturbation_screen(N_CELLS, 10, 6, treated_fraction=0.08, random_state=11)
    counts["gene3"] = 0
    T = treatment.copy()
    T["pert3"] = 0
    few = np.flatnonzero(treatment["pert4"].to_numpy())[:3]
    T["pert4"] = 0
    T.iloc[few, T.columns.get_loc("pert4")] = 1
    T["pert5"] = 1
    pairs = [(f"gene{g}", f"pert{p}") for p in range(6) for g in range(10) if (g + p) % 2 == 0 or g == 3]
    path = _write_h5ad(counts, cov, tmp_path_factory.mktemp("degenerate") / "degenerate.h5ad")
    return counts, T, cov, pairs, path


def _run(data, T, cov, pairs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the not-tested warning is checked below
        return resampling_test(data, T, cov, pairs=pairs, n_resamples=29, random_state=6, return_resampled=True,
                               **kw)


def _check_flags(res, S):
    zero_gene = (res.gene == "gene3").to_numpy()
    by_pert = {"pert3": "no_treated_cells", "pert4": "too_few_treated_cells", "pert5": "no_control_cells"}
    want = res.perturbation.map(by_pert).fillna("").to_numpy(dtype=object)
    want[zero_gene & (want == "")] = "all_zero_gene"
    np.testing.assert_array_equal(res.flag.to_numpy(dtype=object), want)
    tested = want == ""
    assert tested.sum() >= 10
    for col in ("p_empirical", "p_skewnorm", "pvalue", "sn_shape"):
        assert res.loc[~tested, col].isna().all(), col
    assert res.loc[tested, "pvalue"].between(0, 1, inclusive="right").all()
    assert np.isfinite(S[tested]).any(axis=1).all() and np.isnan(S[~tested]).all()
    # a gene without counts: no estimate, statistic or size, whatever its perturbation
    assert res.loc[zero_gene, ["coef", "statistic", "size"]].isna().all().all()


@pytest.mark.parametrize("statistic", ["wald", "score"])
@pytest.mark.parametrize("resampling", ["conditional", "permutation"])
def test_genes_without_counts_are_flagged_on_every_path(degenerate, monkeypatch, resampling, statistic):
    """A gene with no count is not tested (flag "all_zero_gene", NaN statistic and
    p-values; before, the Wald statistic was -inf on every resample, p = 1, and the
    score's permutation p-value could be 1e-8), and untestable perturbations keep their
    flags: the same table, to the last digit, in memory, with a given distillation,
    and from a backed file read by chunks of genes (with and without it)."""
    counts, T, cov, pairs, path = degenerate
    kw = dict(resampling=resampling, statistic=statistic)
    with pytest.warns(UserWarning, match="no counts"):
        dist = distill(counts, cov)
    with _Budgets(genes=1, read=3 * N_CELLS):
        ref, S = _run(counts, T, cov, pairs, **kw)
        _check_flags(ref, S)
        with pytest.warns(UserWarning, match=r"1[0-9] of \d+ pairs were not tested .* 3 of a gene without counts"):
            resampling_test(counts, T, cov, pairs=pairs, n_resamples=29, random_state=6, **kw)
        spy = _Spy(monkeypatch)
        backed, S_backed = _run(_backed(path), T, cov, pairs, **kw)
        monkeypatch.undo()
        assert max(spy.reads) == 3 and sum(spy.reads) == 10  # streamed: every gene once, 3 at a time
        pd.testing.assert_frame_equal(backed, ref, check_exact=True)
        np.testing.assert_array_equal(S_backed, S)
        given_mem, S_mem = _run(counts, T, cov, pairs, distillation=dist, **kw)
        given_backed, S_gb = _run(_backed(path), T, cov, pairs, distillation=dist, **kw)
    _check_flags(given_mem, S_mem)
    pd.testing.assert_frame_equal(given_backed, given_mem, check_exact=True)
    np.testing.assert_array_equal(S_gb, S_mem)


def test_screen_command_computes_q_values_over_the_tested_pairs(degenerate, tmp_path):
    """``skmixed screen`` on a backed file with a gene without counts: its pairs have
    NaN q-values, and the Benjamini-Hochberg q-values are those of the tested pairs
    alone."""
    from skmixed.cli import main

    _, T, cov, pairs, path = degenerate
    T_ok = T.drop(columns="pert5")  # the command refuses a perturbation in every cell
    T_ok.astype(int).set_axis([f"c{i}" for i in range(N_CELLS)]).to_csv(tmp_path / "grna.csv")
    pd.DataFrame([p for p in pairs if p[1] != "pert5"], columns=["gene", "perturbation"]).to_csv(
        tmp_path / "pairs.csv", index=False)
    out = tmp_path / "res.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = main(["screen", str(path), "--backed", "--treatment", str(tmp_path / "grna.csv"), "--pairs",
                       str(tmp_path / "pairs.csv"), "--covariates", *cov.columns, "--n-resamples", "29", "--out",
                       str(out), "-q"])
    assert status == 0
    res = pd.read_csv(out, keep_default_na=False, na_values=[""])
    flagged = res.flag.notna()
    assert (res.flag[res.gene == "gene3"].isin(["all_zero_gene", "no_treated_cells", "too_few_treated_cells"])).all()
    assert (res.flag == "all_zero_gene").sum() == 3
    assert res.q_value[flagged].isna().all()
    q = scipy.stats.false_discovery_control(res.pvalue[~flagged], method="bh")
    np.testing.assert_allclose(res.q_value[~flagged], q, rtol=1e-12)


@pytest.mark.slow
def test_streamed_degenerate_screen_on_dask_equals_in_process(degenerate):
    """The blocks of the streamed path on a Dask cluster of 2 worker processes: the
    flags and every number of the in-process streamed run, for both resamplings."""
    distributed = pytest.importorskip("distributed")
    from skmixed._parallel import local_cluster, parallel_config

    _, T, cov, pairs, path = degenerate
    with local_cluster(2, host="127.0.0.1", worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client, _Budgets(genes=1, read=3 * N_CELLS):
        for resampling in ("conditional", "permutation"):
            ref, S = _run(_backed(path), T, cov, pairs, resampling=resampling)
            with parallel_config(client=client):
                res, S_dask = _run(_backed(path), T, cov, pairs, resampling=resampling)
            _check_flags(res, S_dask)
            pd.testing.assert_frame_equal(res, ref, check_exact=True)
            np.testing.assert_array_equal(S_dask, S)


@pytest.mark.parametrize("resampling", ["conditional", "permutation"])
def test_dask_array_counts_are_streamed_like_a_backed_file(degenerate, monkeypatch, resampling):
    """A dask array of counts is read by the same chunks of genes (each read at most a
    chunk) and gives the in-memory table, flags included, to the last digit."""
    da = pytest.importorskip("dask.array")
    counts, T, cov, pairs, _ = degenerate
    by_position = [(int(g[4:]), p) for g, p in pairs]  # a dask array has no gene names
    Y = counts.to_numpy()
    with _Budgets(genes=1, read=3 * N_CELLS):
        ref, S = _run(Y, T, cov, by_position, resampling=resampling)
        spy = _Spy(monkeypatch)
        res, S_dask = _run(da.from_array(Y, chunks=(N_CELLS, 4)), T, cov, by_position, resampling=resampling)
        monkeypatch.undo()
    assert max(spy.reads) == 3 and sum(spy.reads) == 10
    assert (ref.flag == "all_zero_gene").sum() == 3
    pd.testing.assert_frame_equal(res, ref, check_exact=True)
    np.testing.assert_array_equal(S_dask, S)


@pytest.mark.parametrize("family", ["negative_binomial", "poisson"])
def test_distillation_leaves_genes_without_counts_out(degenerate, family):
    """A gene without counts has no fit (its intercept would run off to -inf, and its
    Newton steps hold back its batch): NaN coef, offsets and NB size, a warning, and the
    other genes' fits are those of the data without it, to the last digit (same batch
    of the others)."""
    from skmixed.offset._distill import NoCountsWarning

    counts, T, cov, _, _ = degenerate
    with pytest.warns(NoCountsWarning, match="1 gene"):
        d = distill(counts, cov, family=family)
    assert np.isnan(d.coef[3]).all() and np.isnan(d.offsets[:, 3]).all()
    assert np.isnan(d.size[3]) if family == "negative_binomial" else d.size[3] == np.inf
    ref = distill(counts.drop(columns="gene3"), cov, family=family)
    np.testing.assert_array_equal(np.delete(d.coef, 3, axis=0), ref.coef)
    np.testing.assert_array_equal(np.delete(d.offsets, 3, axis=1), ref.offsets)
    np.testing.assert_array_equal(np.delete(d.size, 3), ref.size)
    # resampling_test says it through the pairs' flag, with no warning from the arithmetic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resampling_test(counts, T, cov, pairs=[("gene3", "pert0"), ("gene1", "pert0")], n_resamples=19, family=family,
                        random_state=0)
    kinds = {type(w.message).__name__ for w in caught}
    assert kinds == {"UserWarning"}, [str(w.message) for w in caught]


@pytest.mark.parametrize("resampling", ["conditional", "permutation"])
def test_streamed_blocks_on_the_device_path(cis_screen, fake_cupy, resampling):
    """``device="gpu"`` from a backed file (through the numpy-backed CuPy stand-in): the
    streamed blocks take the device path and give the CPU's numbers to round-off."""
    counts, treatment, cov, path = cis_screen
    kw = dict(pairs=CIS, n_resamples=19, resampling=resampling, random_state=1, return_resampled=True)
    with _Budgets(genes=2, read=4 * N_CELLS):
        ref, S = resampling_test(_backed(path), treatment, cov, **kw)
        dev, S_dev = resampling_test(_backed(path), treatment, cov, device="gpu", **kw)
    pd.testing.assert_frame_equal(dev, ref, rtol=1e-10)
    np.testing.assert_allclose(S_dev, S, rtol=1e-10)
