"""GLMEIV against glmeiv (R, timothy-barry/glmeiv): stored fits of the paper's main setting.

tests/reference/eiv/simulate_reference.py simulates the data (seeded); make_reference.R fits
each (mRNA, gRNA) pair with glmeiv's accelerated EM run to its MLE (``ep_tol = 1e-12``) and
stores estimates, Louis standard errors, Wald intervals, delta-method fold changes, the
log-likelihood and the NB size of ``glm.nb``'s covariates-only fit.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skmixed.eiv import GLMEIV

REF = Path(__file__).parent / "reference" / "eiv"
FAMILIES = {"m_pois": "poisson", "m_nb": "negative_binomial"}


@pytest.fixture(scope="module")
def data():
    return pd.read_csv(REF / "glmeiv_data.csv.gz")


@pytest.fixture(scope="module")
def reference():
    ref = pd.read_csv(REF / "glmeiv_reference.csv")
    return ref[ref["fit"] == "mle"]


@pytest.fixture(scope="module")
def fits(data):
    out = {}
    for col, fam in FAMILIES.items():
        model = GLMEIV(mrna_family=fam, random_state=0).fit(
            data[["batch"]].astype(float), data[[col]], grna=data[["g_15", "g_4"]],
            offset=np.log(data["lib_m"]), grna_offset=np.log(data["lib_g"]),
        )
        out[col] = model
    return out


def _pair(model, ref, gene, pert):
    ours = model.results_.query("perturbation == @pert").set_index("parameter")
    theirs = ref.query("gene == @gene and perturbation == @pert").set_index("parameter")
    return ours, theirs.loc[ours.index]


@pytest.mark.parametrize("gene", list(FAMILIES))
@pytest.mark.parametrize("pert", ["g_15", "g_4"])
def test_estimates_and_standard_errors_match_glmeiv(fits, reference, gene, pert):
    ours, theirs = _pair(fits[gene], reference, gene, pert)
    assert list(ours.index) == ["pi", "m_intercept", "m_perturbation", "m_batch",
                                "g_intercept", "g_perturbation", "g_batch"]
    dist = np.abs(ours["estimate"] - theirs["estimate"]) / theirs["std_error"]
    assert dist.max() < 0.05, dist
    np.testing.assert_allclose(ours["std_error"], theirs["std_error"], rtol=0.01)
    np.testing.assert_allclose(ours["z"], theirs["z"], rtol=0.01, atol=0.05)
    for lim in ("confint_lower", "confint_upper"):
        assert np.all(np.abs(ours[lim] - theirs[lim]) / theirs["std_error"] < 0.07)


@pytest.mark.parametrize("gene", list(FAMILIES))
@pytest.mark.parametrize("pert", ["g_15", "g_4"])
def test_fold_changes_match_run_delta_method(fits, reference, gene, pert):
    ours, theirs = _pair(fits[gene], reference, gene, pert)
    rows = ["m_perturbation", "g_perturbation"]
    for col in ("fc_estimate", "fc_confint_lower", "fc_confint_upper"):
        np.testing.assert_allclose(ours.loc[rows, col], theirs.loc[rows, col], rtol=2e-3)
    assert ours.loc["pi", ["fc_estimate"]].isna().all()


@pytest.mark.parametrize("gene", list(FAMILIES))
def test_loglik_and_size_match(fits, reference, gene):
    model = fits[gene]
    for k, pert in enumerate(["g_15", "g_4"]):
        theirs = reference.query("gene == @gene and perturbation == @pert").iloc[0]
        assert model.loglik_[k] == pytest.approx(theirs["loglik"], rel=1e-9, abs=1e-3)
        assert model.pairs_["converged"].iloc[k]
        if gene == "m_nb":
            assert model.mrna_size_[k] == pytest.approx(theirs["mrna_size"], rel=1e-4)
        else:
            assert model.mrna_size_ is None


def test_fixed_size_reproduces_glmeiv(data, reference):
    """With glm.nb's size passed in, the EM alone is compared."""
    theirs = reference.query("gene == 'm_nb' and perturbation == 'g_15'").set_index("parameter")
    model = GLMEIV(mrna_size=float(theirs["mrna_size"].iloc[0]), random_state=1).fit(
        data[["batch"]].astype(float), data["m_nb"], grna=data["g_15"],
        offset=np.log(data["lib_m"]), grna_offset=np.log(data["lib_g"]),
    )
    ours = model.results_.set_index("parameter")
    assert np.max(np.abs(ours["estimate"] - theirs["estimate"]) / theirs["std_error"]) < 0.05
    np.testing.assert_allclose(ours["std_error"], theirs["std_error"], rtol=0.01)


def test_reference_records_provenance(reference):
    assert reference["glmeiv_commit"].nunique() == 1
    assert len(reference["glmeiv_commit"].iloc[0]) == 40
    assert reference["r_version"].str.startswith("R version").all()
