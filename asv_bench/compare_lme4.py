"""Time skmixed's PoissonGLMM against R's lme4 on the ZEB2 model and compare the fits.

    python asv_bench/compare_lme4.py [--repeats 5] [--no-r]

Model: ``ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)``
on ``skmixed.datasets.load_zeb2_like()`` (68,627 cells), by Laplace and by adaptive
Gauss-Hermite quadrature with 25 points.

* skmixed: median wall-clock time of ``--repeats`` fits; the timed region includes
  building the one-hot design and the log offset (glmer's time includes its model
  frame too), not reading the CSV.
* lme4: ``system.time(glmer(...))`` once per model in one ``Rscript`` process, on the
  same CSV (``skmixed/datasets/data/zeb2_like.csv.gz``); loading R and lme4 is not timed.
  Skipped when ``Rscript`` or lme4 is missing (or with ``--no-r``); the accuracy
  columns then use the stored lme4 fits in ``tests/reference/``.

Writes ``doc/benchmarks_table.rst`` and prints the same table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import skmixed
from skmixed import PoissonGLMM
from skmixed.datasets import load_zeb2_like

ROOT = Path(__file__).resolve().parents[1]
DATA_CSV = ROOT / "skmixed" / "datasets" / "data" / "zeb2_like.csv.gz"
TABLE = ROOT / "doc" / "benchmarks_table.rst"
REFERENCE = ROOT / "tests" / "reference"
FORMULA = "ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"
MODELS = [("Laplace", 1, "zeb2_laplace"), ("nAGQ = 25", 25, "zeb2_agq25")]

R_SCRIPT = r"""
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
csv <- args[1]; out <- args[2]
d <- read.csv(gzfile(csv), stringsAsFactors = FALSE)
cfactor <- function(x) factor(x, levels = sort(unique(x), method = "radix"))
d$cell_group <- cfactor(d$cell_group)
d$patient_assignment <- cfactor(d$patient_assignment)
f <- ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)
fmt <- function(x) sprintf("%.17g", x)
for (k in c(1L, 25L)) {
    tm <- system.time(fit <- glmer(f, family = poisson, data = d, nAGQ = k))
    fe <- fixef(fit)
    se <- sqrt(diag(as.matrix(vcov(fit))))[names(fe)]
    write.csv(data.frame(term = names(fe), estimate = fmt(fe), se = fmt(se)),
              file.path(out, sprintf("fixef_%d.csv", k)), row.names = FALSE)
    write.csv(data.frame(seconds = fmt(unname(tm["elapsed"]))),
              file.path(out, sprintf("time_%d.csv", k)), row.names = FALSE)
}
writeLines(c(R.version.string, paste("lme4", as.character(packageVersion("lme4")))),
           file.path(out, "versions.txt"))
"""


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def fit_skmixed(data: pd.DataFrame, nagq: int) -> PoissonGLMM:
    X = pd.get_dummies(data["cell_group"], prefix="cell_group", prefix_sep="", dtype=float)
    return PoissonGLMM(fit_intercept=False, nagq=nagq, reml=False).fit(  # glmer is maximum likelihood
        X, data["ZEB2"], groups=data["patient_assignment"], offset=np.log(data["total_count"])
    )


def time_skmixed(data: pd.DataFrame, nagq: int, repeats: int):
    times, model, caught = [], None, []
    for _ in range(repeats):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            model = fit_skmixed(data, nagq)
            times.append(time.perf_counter() - t0)
        caught = [str(x.message) for x in w]
    return statistics.median(times), model, caught


def have_lme4() -> bool:
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(
        ["Rscript", "-e", 'quit(status = as.integer(!requireNamespace("lme4", quietly = TRUE)))'],
        capture_output=True,
    )
    return probe.returncode == 0


def run_lme4():
    """Fit both models in R; returns ({nagq: (seconds, fixef DataFrame)}, versions)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "fit.R"
        script.write_text(R_SCRIPT)
        proc = subprocess.run(
            ["Rscript", str(script), str(DATA_CSV), tmp], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"Rscript failed:\n{proc.stderr}")
        out = {}
        for _, nagq, _ in MODELS:
            seconds = float(pd.read_csv(Path(tmp) / f"time_{nagq}.csv")["seconds"].iloc[0])
            fe = pd.read_csv(Path(tmp) / f"fixef_{nagq}.csv").set_index("term")
            out[nagq] = (seconds, fe)
        versions = (Path(tmp) / "versions.txt").read_text().strip().replace("\n", ", ")
    return out, versions


def stored_reference(ref_id: str) -> pd.DataFrame:
    return pd.read_csv(REFERENCE / f"{ref_id}_fixef.csv").set_index("term")


def differences(model: PoissonGLMM, ref: pd.DataFrame):
    est = model.fixed_effects_
    se = pd.Series(np.sqrt(np.diag(model.coef_cov_)), index=model.fixed_names_)
    terms = ref.index
    if set(terms) != set(est.index):
        raise RuntimeError(f"fixed-effect names differ: {sorted(set(terms) ^ set(est.index))}")
    d_est = float(np.max(np.abs(est[terms].to_numpy() - ref["estimate"].to_numpy())))
    d_se = float(np.max(np.abs(se[terms].to_numpy() / ref["se"].to_numpy() - 1.0)))
    return d_est, d_se


def difference_se_tight(model: PoissonGLMM, ref_id: str) -> float:
    """Against lme4's vcov recomputed with its inner PIRLS converged (make_reference.R)."""
    ref = stored_reference(ref_id)
    se = pd.Series(np.sqrt(np.diag(model.coef_cov_)), index=model.fixed_names_)[ref.index]
    return float(np.max(np.abs(se.to_numpy() / ref["se_tight"].to_numpy() - 1.0)))


def rst_table(rows, header) -> str:
    cells = [header] + rows
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([rule, line(header), rule, *map(line, rows), rule])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="skmixed fits per model (median)")
    parser.add_argument("--no-r", action="store_true", help="do not run R; compare with stored lme4 fits")
    parser.add_argument("--no-write", action="store_true", help="print only; leave doc/ untouched")
    args = parser.parse_args(argv)

    data = load_zeb2_like()
    n = len(data)

    use_r = not args.no_r and have_lme4()
    if use_r:
        print("running lme4 (Laplace, then nAGQ = 25); this takes a few minutes ...", flush=True)
        r_results, r_versions = run_lme4()
    else:
        print("R/lme4 not run: accuracy is compared with tests/reference/ (stored lme4 fits).")
        r_results, r_versions = {}, None

    rows, notes = [], []
    for label, nagq, ref_id in MODELS:
        print(f"timing skmixed, {label}, {args.repeats} repeats ...", flush=True)
        seconds, model, caught = time_skmixed(data, nagq, args.repeats)
        if caught:
            notes.append(f"skmixed {label} warned: " + "; ".join(sorted(set(caught))))
        if not model.converged_:
            notes.append(f"skmixed {label} did not converge")
        if nagq in r_results:
            r_seconds, ref = r_results[nagq]
            ratio = r_seconds / seconds
            r_time, speedup = f"{r_seconds:.2f}", f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"
        else:
            ref = stored_reference(ref_id)
            r_time, speedup = "n/a", "n/a"
        d_est, d_se = differences(model, ref)
        d_tight = difference_se_tight(model, ref_id)
        rows.append(
            [label, f"{n:,}", r_time, f"{seconds:.3f}", speedup, f"{d_est:.1e}", f"{d_se:.1e}", f"{d_tight:.1e}"]
        )

    header = [
        "model", "cells", "lme4 (s)", "skmixed (s)", "speed-up", "max abs diff fixef",
        "max rel diff SE", "same, lme4 PIRLS converged",
    ]
    today = datetime.date.today().isoformat()
    text = "\n".join(
        [
            ".. This file is generated by asv_bench/compare_lme4.py; do not edit by hand.",
            "",
            f"``{FORMULA}``",
            "",
            rst_table(rows, header),
            "",
            f"* Machine: {machine_description()}.",
            f"* Date: {today}; skmixed {skmixed.__version__}, Python {platform.python_version()}"
            + (f"; {r_versions}." if r_versions else "."),
            f"* skmixed: median of {args.repeats} fits, including building the design matrix. "
            + ("lme4: one ``glmer`` fit per model, default settings except ``nAGQ``."
               if use_r else "lme4 not run; differences are against the stored fits in "
               "``tests/reference/``."),
            "* Differences are skmixed minus lme4: fixed effects in absolute value, standard "
            "errors (default ``vcov``, from the Hessian) relative to lme4's. The last column "
            "compares with lme4's default ``vcov`` recomputed with its inner PIRLS converged "
            "(``se_tight`` in ``tests/reference/``; see the validation page): lme4's default "
            "finite-difference Hessian carries numerical error of that size.",
            *[f"* Note: {x}" for x in notes],
            "",
        ]
    )
    print()
    print(text)
    if not args.no_write:
        TABLE.write_text(text)
        print(f"wrote {TABLE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
