"""The ``skmixed`` console script, end to end (issue 15, point 3).

The installed script runs on small .h5ad files written here from the simulators;
the outputs are checked against the Python API, and bad arguments (exit status 2) and
bad data (exit status 1) against their one-line messages. A few more error paths run
in process through ``skmixed.cli.main``, which the script calls.
"""

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

anndata = pytest.importorskip("anndata")
pytest.importorskip("matplotlib")

from skmixed import PoissonGLMM  # noqa: E402
from skmixed.cli import main, parse_contrast  # noqa: E402
from skmixed.datasets import make_boland_like_counts, make_zinb_counts  # noqa: E402
from skmixed.offset import make_perturbation_screen  # noqa: E402

FORMULA = "~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"
CONTRAST = "UC = T : R : diseased - T : R : healthy"


def _script():
    exe = shutil.which("skmixed")
    if exe is None:  # the package installed without its console script: not what users get
        pytest.fail("the 'skmixed' console script is not on PATH; pip install . (or -e .) first")
    return exe


def run(*args, cwd):
    return subprocess.run([_script(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cells, counts, truth = make_boland_like_counts(n_genes=30, n_cells=3000, random_state=0)
    cells.index = cells.index.astype(str)
    boland = anndata.AnnData(counts.tocsr(), obs=cells, var=pd.DataFrame(index=truth.gene.to_numpy()))
    boland.write_h5ad(d / "boland.h5ad")
    lognorm = boland.copy()
    lognorm.X = lognorm.X.astype(float)
    lognorm.X.data = np.log1p(lognorm.X.data)
    lognorm.write_h5ad(d / "lognorm.h5ad")
    nototal = anndata.AnnData(boland.X, obs=cells.drop(columns="total_count"), var=boland.var)
    nototal.write_h5ad(d / "nototal_empty_cells.h5ad")
    nototal[np.asarray(boland.X.sum(axis=1)).ravel() > 0].write_h5ad(d / "nototal.h5ad")

    sim = make_zinb_counts(200, 40, random_state=0)
    zinb = anndata.AnnData(sim.counts, obs=sim.cells.set_axis([f"cell{i}" for i in range(200)]))
    zinb.write_h5ad(d / "zinb.h5ad")

    Y, treatment, covariates, _ = make_perturbation_screen(600, 4, 3, random_state=0)
    names = [f"cell{i}" for i in range(600)]
    screen = anndata.AnnData(Y.to_numpy(dtype=float), obs=covariates.set_axis(names).join(
        treatment.set_axis(names).astype(int)), var=pd.DataFrame(index=Y.columns))
    screen.write_h5ad(d / "screen.h5ad")
    treatment.set_axis(pd.Index(names, name="cell")).astype(int).to_csv(d / "grna.csv")
    return d, boland


def test_help_texts(capsys):
    top = run("--help", cwd=".")
    assert top.returncode == 0
    for command in ("de", "zinbwave", "screen"):
        assert command in top.stdout
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        page = capsys.readouterr().out
        assert "example:" in page and f"skmixed {command} data.h5ad" in page


def test_de_writes_table_and_volcano_plot(files):
    d, boland = files
    r = run("de", "boland.h5ad", "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de.csv",
            "--plot", "volcano.png", "--h5ad", "de.h5ad", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "Fitted 30 genes x 3,000 cells" in r.stdout
    assert "Contrast 'UC': 30 genes tested" in r.stdout and "at 5% FDR" in r.stdout
    assert "PoissonGLMM genes" in r.stderr  # the progress bar is on in the command line
    table = pd.read_csv(d / "de.csv")
    ref = PoissonGLMM.from_formula(FORMULA, boland).contrast(
        {"UC": {"cell_groupT : R : diseased": 1.0, "cell_groupT : R : healthy": -1.0}})
    assert list(table.columns) == [*ref.columns, "flag"]
    np.testing.assert_allclose(table.estimate, ref.estimate, rtol=1e-12)
    np.testing.assert_allclose(table.q_value, ref.q_value, rtol=1e-12)
    assert set(table.flag) <= {"ok", "all_zero", "zero_count_group", "singular", "not_converged"}
    assert (d / "volcano.png").read_bytes()[:4] == b"\x89PNG"
    stored = anndata.read_h5ad(d / "de.h5ad")
    assert list(stored.uns["skmixed_de"]["names"]["UC"]) == table.sort_values("p_value", kind="stable").gene.tolist()
    np.testing.assert_allclose(stored.varm["skmixed_de"]["UC|q_value"], table.q_value)
    assert stored.uns["skmixed_de"]["params"]["formula"] == FORMULA


def test_de_adds_total_count_when_obs_has_none(files, monkeypatch, capsys):
    d, boland = files
    monkeypatch.chdir(d)
    assert main(["de", "nototal.h5ad", "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de2.csv", "-q"]) == 0
    assert "total_count: not a column of .obs; using each cell's total count over the 30 genes" in capsys.readouterr().out
    ref = anndata.read_h5ad(d / "nototal.h5ad")
    ref.obs["total_count"] = np.asarray(ref.X.sum(axis=1)).ravel()
    expected = PoissonGLMM.from_formula(FORMULA, ref).contrast(
        {"UC": {"cell_groupT : R : diseased": 1.0, "cell_groupT : R : healthy": -1.0}})
    np.testing.assert_allclose(pd.read_csv(d / "de2.csv").estimate, expected.estimate, rtol=1e-10)


def test_zinbwave_writes_obsm_and_csv(files):
    d, _ = files
    r = run("zinbwave", "zinb.h5ad", "-k", "2", "--batch", "batch", "--max-iter", "5", "--out", "out.h5ad",
            "--csv", "W.csv", "-q", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "ZINBWaVE, K = 2, on 200 cells x 40 genes" in r.stdout
    assert "skmixed: warning: ZINBWaVE did not converge" in r.stderr  # 5 iterations; one line
    assert "ZINBWaVE iterations" not in r.stderr  # --quiet
    out = anndata.read_h5ad(d / "out.h5ad")
    W = out.obsm["X_zinbwave"]
    assert W.shape == (200, 2) and np.isfinite(W).all()
    assert out.uns["X_zinbwave"]["params"]["batch"] == "batch"
    csv = pd.read_csv(d / "W.csv", index_col=0)
    assert list(csv.index) == list(out.obs_names)
    np.testing.assert_allclose(csv.to_numpy(), W)


def test_screen_from_csv_and_from_obs(files):
    d, _ = files
    r = run("screen", "screen.h5ad", "--treatment", "grna.csv", "--covariates", "log_lib", "batch",
            "--n-resamples", "49", "--out", "res.csv", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "Tested 12 of 12 (gene, perturbation) pairs on 600 cells" in r.stdout
    assert "resampling_test pairs" in r.stderr
    res = pd.read_csv(d / "res.csv")
    assert len(res) == 12 and {"gene", "perturbation", "pvalue", "q_value", "flag"} <= set(res.columns)
    assert ((res.q_value >= res.pvalue) | res.pvalue.isna()).all()
    r2 = run("screen", "screen.h5ad", "--treatment-obs", "pert0", "pert1", "pert2", "--covariates", "log_lib",
             "batch", "--n-resamples", "49", "--out", "res2.csv", "-q", cwd=d)
    assert r2.returncode == 0, r2.stderr
    pd.testing.assert_frame_equal(pd.read_csv(d / "res2.csv"), res)  # same treatment, same seed


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["de", "boland.h5ad", "--formula", FORMULA, "--out", "de.csv"], 2,
         "skmixed de: error: the following arguments are required: --contrast"),
        (["de", "lognorm.h5ad", "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de.csv"], 1,
         "skmixed de: error: data.X holds non-integer values"),
    ],
)
def test_console_script_errors_are_one_line(files, args, status, message):
    d, _ = files
    r = run(*args, cwd=d)
    assert r.returncode == status
    assert r.stderr.startswith(message)
    assert r.stderr.count("\n") == 1 and r.stdout == ""


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["de", "missing.h5ad", "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de.csv"], 2,
         "skmixed de: error: DATA 'missing.h5ad': no such file."),
        (["de", "boland.h5ad", "--formula", "~ 0 + cell_grp + (1 | patient_assignment)", "--contrast", "x",
          "--out", "de.csv"], 1, "skmixed de: error: --formula: unknown column 'cell_grp'"),
        (["de", "boland.h5ad", "--formula", FORMULA, "--contrast", "UC = T : R : sick - T : R : healthy",
          "--out", "de.csv"], 2, "--contrast: contrast 'UC = T : R : sick - T : R : healthy': 'T : R : sick"),
        (["de", "boland.h5ad", "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de.txt"], 2,
         "--out 'de.txt' must end in .csv or .tsv"),
        (["de", "boland.h5ad", "--formula", "cell_group", "--contrast", CONTRAST, "--out", "de.csv"], 2,
         "has no '~'"),
        (["de", "boland.h5ad", "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de.csv", "--layer", "raw"], 2,
         "--layer 'raw' is not a layer of boland.h5ad"),
        (["de", "boland.h5ad", "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de.csv",
          "--scheduler", "localhost:8786"], 2, "--scheduler must be 'local' or an address such as tcp://host:8786"),
        (["de", "boland.h5ad", "--formula", "~ 0 + cell_group + (1 | patient_assignment) + (1 | tissue)",
          "--contrast", CONTRAST, "--out", "de.csv"], 1, "exactly one random intercept"),
        (["de", "nototal_empty_cells.h5ad", "--formula", FORMULA, "--contrast", CONTRAST, "--out", "de.csv"], 1,
         "cells have no count over the 30 genes of DATA.X, so log(total_count) is -inf"),
        (["zinbwave", "zinb.h5ad", "-k", "two", "--out", "z.h5ad"], 2, "argument -k/--n-components: invalid int"),
        (["zinbwave", "zinb.h5ad", "--batch", "lane", "--out", "z.h5ad"], 1, "--batch: ['lane'] not columns of .obs"),
        (["zinbwave", "zinb.h5ad", "--out", "z.csv"], 2, "--out 'z.csv' must end in .h5ad"),
        (["screen", "screen.h5ad", "--out", "r.csv"], 2, "give exactly one of --treatment"),
        (["screen", "screen.h5ad", "--treatment", "none.csv", "--out", "r.csv"], 2, "--treatment 'none.csv': no such"),
        (["screen", "screen.h5ad", "--treatment-obs", "log_lib", "--out", "r.csv"], 1, "present in every cell"),
        (["screen", "screen.h5ad", "--treatment-obsm", "grna", "--out", "r.csv"], 1, "'grna' is not an obsm key"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ],
)
def test_main_errors(files, monkeypatch, capsys, args, status, message):
    d, _ = files
    monkeypatch.chdir(d)
    assert main(args) == status
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_parse_contrast():
    coefs = ["cell_groupT : R : diseased", "cell_groupT : R : healthy", "cell_groupCD4-T", "cell_groupCD4"]
    assert parse_contrast("cell_groupCD4-T - cell_groupCD4", coefs) == (
        "cell_groupCD4-T - cell_groupCD4", {"cell_groupCD4-T": 1.0, "cell_groupCD4": -1.0})
    name, w = parse_contrast(" avg = 0.5 * T : R : diseased + 0.5*T : R : healthy - CD4", coefs, ["cell_group"])
    assert name == "avg" and w == {"cell_groupT : R : diseased": 0.5, "cell_groupT : R : healthy": 0.5,
                                   "cell_groupCD4": -1.0}
    with pytest.raises(ValueError, match="its coefficients are"):
        parse_contrast("CD8 - CD4", coefs, ["cell_group"])
    with pytest.raises(ValueError, match="is empty"):
        parse_contrast("name = ", coefs)


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "skmixed.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("skmixed ")
