"""AnnData in, AnnData out (issue 15, point 2) and progress bars (point 4).

PoissonGLMM.from_formula on an AnnData equals the fit on the count matrix; a contrast
table stored as scanpy stores rank_genes_groups; ZINBWaVE's W in obsm; the progress bars
silent by default and on with ``verbose``.
"""

import logging
import sys

import numpy as np
import pandas as pd
import pytest

anndata = pytest.importorskip("anndata")

from skmixed import PoissonGLMM, ZINBWaVE, resampling_test  # noqa: E402
from skmixed._inputs import store_contrast  # noqa: E402
from skmixed._progress import check_verbose, progress  # noqa: E402
from skmixed.datasets import make_boland_like_counts, make_zinb_counts  # noqa: E402
from skmixed.offset import make_perturbation_screen  # noqa: E402

FORMULA = "~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"
CONTRAST = {"UC vs healthy": {"cell_groupT : R : diseased": 1.0, "cell_groupT : R : healthy": -1.0}}


@pytest.fixture(scope="module")
def boland():
    cells, counts, truth = make_boland_like_counts(12, 2000, random_state=1)
    cells.index = cells.index.astype(str)
    adata = anndata.AnnData(counts.tocsr(), obs=cells, var=pd.DataFrame(index=truth.gene.to_numpy()))
    return cells, counts, truth, adata


@pytest.fixture(scope="module")
def formula_fit(boland):
    return PoissonGLMM.from_formula(FORMULA, boland[3])


def test_from_formula_anndata_equals_matrix_fit(boland, formula_fit):
    cells, counts, truth, _ = boland
    X = pd.get_dummies(cells.cell_group, prefix="cell_group", prefix_sep="", dtype=float)
    ref = PoissonGLMM(fit_intercept=False).fit(X, counts, groups=cells.patient_assignment,
                                               offset=np.log(cells.total_count))
    m = formula_fit
    assert m.fixed_names_ == ref.fixed_names_  # lme4's names: cell_groupB : PBMC : diseased, ...
    assert list(m.gene_names_) == list(truth.gene)
    np.testing.assert_allclose(m.coef_, ref.coef_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.coef_se_, ref.coef_se_, rtol=1e-10)
    np.testing.assert_allclose(m.theta_, ref.theta_, rtol=1e-10)
    pd.testing.assert_frame_equal(m.contrast(CONTRAST).drop(columns="gene"), ref.contrast(CONTRAST).drop(columns="gene"))
    assert m.group_names_ == ["patient_assignment"]


def test_from_formula_anndata_reads_the_counts_layer(boland, formula_fit):
    _, counts, _, adata = boland
    lognorm = adata.copy()
    lognorm.layers["counts"] = counts.tocsr()
    lognorm.X = lognorm.X.astype(float)
    lognorm.X.data = np.log1p(lognorm.X.data)  # .X normalised: layers["counts"] is read
    m = PoissonGLMM.from_formula(FORMULA, lognorm)
    np.testing.assert_allclose(m.coef_, formula_fit.coef_)
    lognorm.layers["raw"] = lognorm.layers["counts"]
    np.testing.assert_allclose(PoissonGLMM.from_formula(FORMULA, lognorm, layer="raw").coef_, formula_fit.coef_)
    del lognorm.layers["counts"]
    with pytest.raises(ValueError, match=r"data.X holds non-integer values"):
        PoissonGLMM.from_formula(FORMULA, lognorm)


def test_from_formula_anndata_response_gene_fits_that_gene(boland, formula_fit):
    cells, counts, truth, adata = boland
    j = int(np.flatnonzero(formula_fit.flags_ == "")[0])  # a gene with every MLE finite
    gene = truth.gene[j]
    one = PoissonGLMM.from_formula(f"{gene} ~ {FORMULA[1:]}", adata)
    frame = cells.assign(**{gene: counts[:, j].toarray().ravel()})
    ref = PoissonGLMM.from_formula(f"{gene} ~ {FORMULA[1:]}", frame)
    np.testing.assert_allclose(one.coef_, ref.coef_)
    np.testing.assert_allclose(one.coef_, formula_fit.coef_[j], atol=1e-5)
    assert one.formula_ == f"{gene} ~ {FORMULA[1:]}"


def test_from_formula_anndata_errors_name_the_problem(boland):
    adata = boland[3]
    with pytest.raises(ValueError, match=r"exactly one random intercept.*\(1 \| patient_assignment\), \(1 \| tissue\)"):
        PoissonGLMM.from_formula("~ 0 + cell_group + (1 | patient_assignment) + (1 | tissue)", adata)
    with pytest.raises(ValueError, match=r"exactly one random intercept.*nagq=3"):
        PoissonGLMM.from_formula(FORMULA, adata, nagq=3)
    with pytest.raises(ValueError, match=r"unknown column 'cell_grp'.*columns of data.obs.*'cell_group'"):
        PoissonGLMM.from_formula("~ 0 + cell_grp + (1 | patient_assignment)", adata)
    with pytest.raises(ValueError, match=r"'notagene' is neither a gene of data.var_names nor a column of data.obs"):
        PoissonGLMM.from_formula("notagene ~ 0 + cell_group + (1 | patient_assignment)", adata)
    with pytest.raises(ValueError, match=r"layer='raw' is not a layer"):
        PoissonGLMM.from_formula(FORMULA, adata, layer="raw")


def test_from_formula_dataframe_unchanged():
    from skmixed.datasets import load_zeb2_like

    data = load_zeb2_like()
    f = "ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"
    m = PoissonGLMM.from_formula(f, data)
    assert m.formula_ == f and m.coef_.ndim == 1
    with pytest.raises(ValueError, match="has no response"):
        PoissonGLMM.from_formula(FORMULA, data)
    with pytest.raises(ValueError, match=r"layer='counts' applies to AnnData data only"):
        PoissonGLMM.from_formula(f, data, layer="counts")


# --------------------------------------------------------------- store_contrast
def _rank_genes_groups_df(adata, group, key):
    """What scanpy.get.rank_genes_groups_df reads (scanpy is not a test dependency)."""
    assert adata.uns[key]["params"]["method"]
    cols = ["names", "scores", "logfoldchanges", "pvals", "pvals_adj"]
    return pd.DataFrame({c: pd.DataFrame(adata.uns[key][c])[group].to_numpy() for c in cols})


def test_store_contrast_like_rank_genes_groups(boland, formula_fit, tmp_path):
    adata = boland[3].copy()
    table = formula_fit.contrast({**CONTRAST, "T vs B in rectum, UC": {"cell_groupT : R : diseased": 1.0,
                                                                        "cell_groupB : R : diseased": -1.0}})
    store_contrast(adata, table, key_added="de", params={"formula": FORMULA})
    adata.write_h5ad(tmp_path / "de.h5ad")
    back = anndata.read_h5ad(tmp_path / "de.h5ad")
    for name, part in table.groupby("contrast", sort=False):
        df = _rank_genes_groups_df(back, name, "de")
        ranked = part.sort_values("p_value", kind="stable")
        assert df.names.tolist() == ranked.gene.tolist()  # smallest p first
        np.testing.assert_allclose(df.pvals, ranked.p_value)
        np.testing.assert_allclose(df.pvals_adj, ranked.q_value)
        np.testing.assert_allclose(df.scores, ranked.statistic, rtol=1e-6)
        np.testing.assert_allclose(df.logfoldchanges, ranked.estimate / np.log(2), rtol=1e-6)
        varm = back.varm["de"]
        assert list(varm.index) == list(back.var_names)
        np.testing.assert_allclose(varm[f"{name}|q_value"], part.set_index("gene").q_value.loc[back.var_names])
    assert back.uns["de"]["params"]["formula"] == FORMULA


def test_store_contrast_bad_input(boland, formula_fit):
    adata = boland[3].copy()
    table = formula_fit.contrast(CONTRAST)
    with pytest.raises(ValueError, match="adata must be an AnnData"):
        store_contrast(table, table)
    with pytest.raises(ValueError, match=r"table must be a contrast table.*'q_value'"):
        store_contrast(adata, table.drop(columns="q_value"))
    with pytest.raises(ValueError, match="not var_names of adata"):
        store_contrast(adata, table.assign(gene="GAPDH"))
    with pytest.raises(ValueError, match="cannot contain '/'"):
        store_contrast(adata, table.assign(contrast="M/DC vs T"))
    with pytest.raises(ValueError, match="key_added must be a non-empty string"):
        store_contrast(adata, table, key_added="")


# -------------------------------------------------------------- ZINBWaVE obsm
@pytest.fixture(scope="module")
def zinb_adata():
    sim = make_zinb_counts(150, 40, random_state=0)
    return anndata.AnnData(sim.counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(150)]))


def test_zinbwave_writes_obsm(zinb_adata):
    adata = zinb_adata.copy()
    model = ZINBWaVE(n_components=2, max_iter=5, random_state=0)
    with pytest.warns(Warning):  # 5 iterations do not converge
        W = model.fit_transform(adata, key_added="X_zinbwave")
    np.testing.assert_array_equal(adata.obsm["X_zinbwave"], W)
    np.testing.assert_array_equal(W, model.W_)
    model.transform(adata, key_added="X_again")
    np.testing.assert_array_equal(adata.obsm["X_again"], W)
    plain = ZINBWaVE(n_components=2, max_iter=5, random_state=0)
    with pytest.warns(Warning):
        plain.fit_transform(adata)  # no key_added: nothing written
    assert set(adata.obsm.keys()) == {"X_zinbwave", "X_again"}


def test_zinbwave_key_added_bad_input(zinb_adata):
    model = ZINBWaVE(n_components=2, max_iter=5, random_state=0)
    with pytest.raises(ValueError, match=r"key_added='X_zinbwave' stores the result in Y.obsm, so Y must be an AnnData"):
        model.fit_transform(zinb_adata.X, key_added="X_zinbwave")  # before fitting
    assert not hasattr(model, "W_")
    with pytest.raises(ValueError, match="key_added must be a non-empty string"):
        model.fit_transform(zinb_adata, key_added=3)


# -------------------------------------------------------------------- progress
def test_progress_silent_by_default_and_on_with_verbose(boland, zinb_adata, capfd, caplog):
    cells, counts, _, adata = boland
    PoissonGLMM.from_formula(FORMULA, adata)
    screen = make_perturbation_screen(300, 3, 2, random_state=0)
    resampling_test(*screen[:3], n_resamples=19, random_state=0)
    with pytest.warns(Warning):
        ZINBWaVE(n_components=1, max_iter=2, random_state=0).fit(zinb_adata)
    out, err = capfd.readouterr()
    assert out == "" and err == ""

    with caplog.at_level(logging.INFO, logger="skmixed"):
        PoissonGLMM.from_formula(FORMULA, adata, verbose=1)
        resampling_test(*screen[:3], n_resamples=19, random_state=0, verbose=1)
        with pytest.warns(Warning):
            ZINBWaVE(n_components=1, max_iter=2, random_state=0, verbose=1).fit(zinb_adata)
    err = capfd.readouterr().err
    assert "PoissonGLMM genes" in err and "12/12" in err
    assert "resampling_test pairs" in err and "6/6" in err
    assert "ZINBWaVE iterations" in err and "penalized loglik" in err
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "PoissonGLMM: 12 genes" in messages and "resampling_test: 6 pairs" in messages
    assert "ZINBWaVE iteration 2" in messages


def test_verbose_checked_and_progress_without_tqdm(monkeypatch):
    with pytest.raises(ValueError, match="verbose must be a non-negative integer"):
        PoissonGLMM(verbose=-1).fit(np.ones((4, 1)), np.ones(4), groups=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="verbose must be a non-negative integer"):
        resampling_test(np.ones((10, 2)), np.eye(10, 1), verbose="yes")
    assert check_verbose(True) == 1 and check_verbose(2) == 2
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # imports fail: a silent stand-in
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with progress(total=3, verbose=1) as bar:
        bar.update(2)
        bar.set_postfix_str("x")
    assert bar.n == 2 and type(bar).__name__ == "_NoBar"


def test_store_contrast_read_by_scanpy(boland, formula_fit):
    sc = pytest.importorskip("scanpy")  # not a test dependency: runs where scanpy is installed
    adata = boland[3].copy()
    table = formula_fit.contrast(CONTRAST)
    store_contrast(adata, table, key_added="de")
    df = sc.get.rank_genes_groups_df(adata, group="UC vs healthy", key="de")
    pd.testing.assert_frame_equal(df, _rank_genes_groups_df(adata, "UC vs healthy", "de"), check_dtype=False)
