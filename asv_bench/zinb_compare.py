"""ZINBWaVE beside zinbwave (R): pbmc500 and simulated data; writes doc/benchmarks_zinb.rst.

Usage (from the repository root)::

    python asv_bench/zinb_compare.py [--large N_CELLS] [--threads T] [--skip-pbmc]

The figures in doc/benchmarks_zinb.rst come from ``--threads 2``.

1. pbmc500 (10x pbmc3k raw counts, top 500 genes; tests/reference/zinb/): for every
   zinbwave fit in fits.csv on these data, our fit of the same data with the same K:
   penalised log-likelihood (ours and zinbwave's) and seconds. Held-out log-likelihood per
   entry (train on the "train" cells, score the "test" cells with the gene parameters
   fixed) and imputation error (10% of the non-zeros masked to 0; median |truth - imputed
   mean| at the masked entries), beside zinbwave's where evaluation.csv has them.
2. Simulated data (make_zinb_counts, N_CELLS x 1000 genes, K = 10): wall time of the fit.

Timings depend on the machine and on its load: the table records both.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import sys
import time
import warnings

import numpy as np
import scipy.sparse as sp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REF = os.path.join(ROOT, "tests", "reference", "zinb")

from skmixed import ZINBWaVE  # noqa: E402
from skmixed.datasets import make_zinb_counts  # noqa: E402
from skmixed.zinb import _evaluate  # noqa: E402


def dicts(name):
    path = os.path.join(REF, name)
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def pbmc():
    Y = sp.load_npz(os.path.join(REF, "pbmc500.npz")).astype(float).tocsr()
    split = np.array([r["split"] == "train" for r in dicts("pbmc500_split.csv")])
    mask = dicts("pbmc500_mask.csv")
    rows = np.array([int(r["row"]) for r in mask])
    cols = np.array([int(r["col"]) for r in mask])
    truth = np.array([float(r["value"]) for r in mask])
    return Y, split, rows, cols, truth


CPU = {}


def sim_counts():
    """The counts of zinbwave's reference simulation (tests/reference/zinb/make_data.py)."""
    with gzip.open(os.path.join(REF, "sim_counts.csv.gz"), "rt") as fh:
        rows = list(csv.reader(fh))
    return np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def timed_fit(Y, K, threads, **kw):
    """The fit and its wall seconds (its CPU seconds, all threads, go to ``CPU[id(model)]``)."""
    t, c = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = ZINBWaVE(K, random_state=0, n_jobs=threads, **kw).fit(Y)
    CPU[id(m)] = time.process_time() - c
    return m, time.perf_counter() - t


def load() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--large-iter", type=int, default=None, help="cap the iterations of the large fit")
    ap.add_argument("--skip-pbmc", action="store_true")
    ap.add_argument("--kernel", choices=("numba", "numpy"), default=None, help="the CPU kernel (default: numba if installed)")
    ap.add_argument("--kernels-only", type=int, default=0, metavar="N_CELLS",
                    help="only the side-by-side of the kernels and precisions (3 iterations, N_CELLS x 1000, K = 10)")
    ap.add_argument("--out", default=os.path.join(ROOT, "doc", "benchmarks_zinb.rst"))
    args = ap.parse_args()
    if args.kernels_only:
        kernels(args.kernels_only, args.threads)
        return
    if args.kernel:
        _evaluate.use_kernel(args.kernel)
    fits = {r["fit"]: r for r in dicts("fits.csv")}
    ev = {(r["fit"], r["quantity"]): float(r["value"]) for r in dicts("evaluation.csv")}
    lines = []
    if not args.skip_pbmc and os.path.exists(os.path.join(REF, "pbmc500.npz")):
        Y, split, rows, cols, truth = pbmc()
        K = int(fits["pbmc500_full"]["K"]) if "pbmc500_full" in fits else 10
        r = fits.get("pbmc500_full")
        fair = ev.get(("pbmc500_full", "penalized_loglik_at_best_common_zeta"))
        for max_iter, tol in ((1, None), (3, None), (None, 1e-4), (None, None)):
            kw = {"max_iter": max_iter} if max_iter else {}
            if tol is not None:
                kw["tol"] = tol
            m, sec = timed_fit(Y, K, args.threads, **kw)
            label = "pbmc500, all cells" + (
                f", {max_iter} iteration(s)" if max_iter
                else ", zinbwave's stopping rule (tol = 1e-4)" if tol else ", to the default tol (1e-5)")
            lines.append((label, f"{Y.shape[0]} x {Y.shape[1]}", K,
                          m.penalized_loglik_, float(r["penalized_loglik"]) if r else None,
                          sec, float(r["elapsed_s"]) if r else None, m.n_iter_))
        # zinbwave's own simulation, K = 2, at zinbwave's stopping rule
        r2 = fits.get("sim_K2")
        if r2 is not None:
            Ys = sim_counts()
            m, sec = timed_fit(Ys, 2, args.threads, tol=1e-4)
            lines.append(("zinbwave's simulation (sim_K2), zinbwave's stopping rule (tol = 1e-4)",
                          f"{Ys.shape[0]} x {Ys.shape[1]}", 2, m.penalized_loglik_, float(r2["penalized_loglik"]),
                          sec, float(r2["elapsed_s"]), m.n_iter_))
        # held-out log-likelihood
        mt, sec_t = timed_fit(Y[split], K, args.threads)
        held = mt.score(Y[~split])
        held_r = ev.get(("pbmc500_train", "heldout_loglik_per_entry"))
        # imputation
        Ym = Y.toarray()
        Ym[rows, cols] = 0.0
        keep = Ym.sum(0) > 0
        mm, sec_m = timed_fit(sp.csr_matrix(Ym[:, keep]), K, args.threads)
        mu = mm.mu(sp.csr_matrix(Ym[:, keep]))
        pi = mm.pi(sp.csr_matrix(Ym[:, keep]))
        cmap = np.cumsum(keep) - 1
        ok = keep[cols]
        err_mu = float(np.median(np.abs(truth[ok] - mu[rows[ok], cmap[cols[ok]]])))
        err_mean = float(np.median(np.abs(truth[ok] - (mu * (1 - pi))[rows[ok], cmap[cols[ok]]])))
        err_r = ev.get(("pbmc500_masked", "median_abs_error_mu_times_1_minus_pi"))
        err_r_mu = ev.get(("pbmc500_masked", "median_abs_error_mu"))
        imp = mm.impute(sp.csr_matrix(Ym[:, keep]))
        err_imp = float(np.median(np.abs(truth[ok] - imp[rows[ok], cmap[cols[ok]]])))
        err_r_imp = ev.get(("pbmc500_masked", "median_abs_error_imputeZeros"))
        extra = (held, held_r, err_mean, err_r, err_mu, err_r_mu, err_imp, err_r_imp, sec_t, sec_m, fair)
    else:
        extra = None
    args.large_note = ""
    if args.large:
        large(args, lines)
    write(args.out, lines, extra, args.threads, args.large_note)


def large(args, lines):
    sim = make_zinb_counts(args.large, 1000, n_clusters=8, n_latent=10, mean_log_mu=-1.0, random_state=0)
    Ysim = sim.counts
    keep = np.asarray((Ysim > 0).sum(0)).ravel() > 0
    Ysim = Ysim[:, keep][np.asarray((Ysim[:, keep] > 0).sum(1)).ravel() > 0]
    cells_kept = np.asarray((sim.counts[:, keep] > 0).sum(1)).ravel() > 0
    kw = {"max_iter": args.large_iter} if args.large_iter else {}
    load_before = load()
    m, sec = timed_fit(Ysim, 10, args.threads, **kw)
    load_after = load()
    label = "simulated (make_zinb_counts)" + (f", {args.large_iter} iterations" if args.large_iter else ", to tol")
    lines.append((label, f"{Ysim.shape[0]} x {Ysim.shape[1]}", 10,
                  m.penalized_loglik_, None, sec, None, m.n_iter_))
    # known truth: the simulated cell types from k-means on W
    from sklearn.cluster import KMeans  # noqa: PLC0415
    from sklearn.metrics import adjusted_rand_score  # noqa: PLC0415

    truth = sim.cells["cluster"].to_numpy()[cells_kept]
    ari = adjusted_rand_score(truth, KMeans(8, n_init=4, random_state=0).fit_predict(m.W_))
    args.large_note = (
        f"\nThe simulated fit ({Ysim.shape[0]:,} cells x {Ysim.shape[1]:,} genes, K = 10, "
        f"``make_zinb_counts({args.large}, 1000, n_clusters=8, n_latent=10, mean_log_mu=-1)``, "
        f"{Ysim.nnz / (Ysim.shape[0] * Ysim.shape[1]):.0%} non-zero): {sec:.1f} s including the "
        f"initialisation ({CPU[id(m)]:.1f} s of CPU time, all threads), {m.n_iter_} iterations, converged: {m.converged_}; load average "
        f"{load_before} before and {load_after} after (the fit itself keeps both cores busy). "
        f"k-means (8 clusters) on its W recovers the 8 simulated cell types with ARI {ari:.3f}.\n"
    )


def kernels(n_cells, threads, repeats=3):
    """numba vs numpy kernel, mixed vs double precision, interleaved: median seconds."""
    sim = make_zinb_counts(n_cells, 1000, n_clusters=8, n_latent=10, mean_log_mu=-1.0, random_state=0)
    cases = [("numpy", "double"), ("numba", "double"), ("numba", "mixed")]
    wall = {c: [] for c in cases}
    cpu = {c: [] for c in cases}
    obj = {}
    for _ in range(repeats):
        for kernel, precision in cases:
            _evaluate.use_kernel(kernel)
            m, sec = timed_fit(sim.counts, 10, threads, max_iter=3, tol=0.0, precision=precision)
            wall[(kernel, precision)].append(sec)
            cpu[(kernel, precision)].append(CPU[id(m)])
            obj[(kernel, precision)] = m.penalized_loglik_
    base = obj[("numpy", "double")]
    print(f"{n_cells} x 1000, K = 10, 3 iterations (initialisation included), {threads} thread(s), "
          f"median of {repeats} interleaved runs; load average {load()} at the end")
    for c in cases:
        print(f"  {c[0]:6s} {c[1]:7s} wall {np.median(wall[c]):7.1f} s  CPU {np.median(cpu[c]):7.1f} s  "
              f"objective {obj[c]:.6f} (relative difference {abs(obj[c] - base) / abs(base):.1e})")


def fmt(v, spec="{:.1f}"):
    return "n/a" if v is None else spec.format(v)


def write(path, lines, extra, threads, note=""):
    head = (
        "ZINB-WaVE: timings and agreement with zinbwave (R)\n"
        "--------------------------------------------------\n\n"
        f"Generated by ``asv_bench/zinb_compare.py`` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {threads} elementwise thread(s), {_evaluate.KERNEL} kernel, load average {load()} "
        "at the end (1 / 5 / 15 minutes; the runs themselves keep the cores busy). zinbwave's figures come from "
        "``tests/reference/zinb/fits.csv`` (zinbwave 1.25.2, serial).\n\n"
    )
    rows = [".. list-table::", "   :header-rows: 1", "",
            "   * - data", "     - cells x genes", "     - K", "     - penalised loglik (skmixed)",
            "     - penalised loglik (zinbwave)", "     - seconds (skmixed)", "     - seconds (zinbwave)",
            "     - iterations"]
    for name, shape, K, pll, pll_r, sec, sec_r, it in lines:
        rows += [f"   * - {name}", f"     - {shape}", f"     - {K}", f"     - {pll:.2f}",
                 f"     - {fmt(pll_r, '{:.2f}')}", f"     - {sec:.1f}", f"     - {fmt(sec_r)}", f"     - {it}"]
    body = "\n".join(rows) + "\n"
    if extra is not None:
        held, held_r, err_mean, err_r, err_mu, err_r_mu, err_imp, err_r_imp, sec_t, sec_m, fair = extra
        body += (
            f"\nzinbwave's pbmc500 fit with only its dispersion re-optimised (its search stops on the "
            f"Poisson plateau) has penalised log-likelihood {fmt(fair, '{:.2f}')}.\n"
        )
        body += (
            "\npbmc500 held-out log-likelihood per entry (train cells fitted, test cells scored "
            f"with the gene parameters fixed): skmixed {held:.5f}, zinbwave {fmt(held_r, '{:.5f}')}.\n\n"
            "Imputation (10% of the non-zeros masked): median absolute error of "
            f"``(1 - pi) mu``: skmixed {err_mean:.4f}, zinbwave {fmt(err_r, '{:.4f}')}; of ``mu``: "
            f"skmixed {err_mu:.4f}, zinbwave {fmt(err_r_mu, '{:.4f}')}; of zinbwave's ``imputeZeros``: "
            f"skmixed {err_imp:.4f}, zinbwave {fmt(err_r_imp, '{:.4f}')}. "
            f"(Fits: {sec_t:.1f} s and {sec_m:.1f} s.)\n"
        )
    body += note
    with open(path, "w") as fh:
        fh.write(head + body)
    print(head + body)


if __name__ == "__main__":
    main()
