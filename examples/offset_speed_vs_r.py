"""Speed of the mean-plus-offset fits and of the resampling test, against R.

Not a gallery example: a benchmark script. Run from the repository root::

    python examples/offset_speed_vs_r.py            # everything (about 10 minutes)
    python examples/offset_speed_vs_r.py --quick    # 20,000 cells instead of 200,000
    python examples/offset_speed_vs_r.py --no-r --repeat 3          # no R comparison
    python examples/offset_speed_vs_r.py --gpu --no-r               # also on a CUDA GPU (CuPy)
    python examples/offset_speed_vs_r.py --no-resampling            # the one-fit comparison only

It prints

1. the time of one fit on 2,000 cells: R's ``glm(y ~ 1 + offset(o), family =
   negative.binomial(2))`` (and ``MASS::glm.nb``), against ``NegBinOffsetMean``
   called once, and per fit when G x B fits run in one call (all 2,000 cells in
   every fit, and 1% of them: the SCEPTRE setting), and per fit for one gene of 200,000
   cells with 500 resampled 1%-treatment indicators as a CSC matrix (2,000 treated cells
   per fit, as R's 2,000-cell fit; median of 15 calls);
2. the resampling test of 1,000 gene x perturbation pairs with B = 500 resamples on
   200,000 cells (1% treated on average over cells and perturbations, each
   perturbation's probability depending on the covariates), laid out as 100 perturbations x 10 genes
   and as 1,000 perturbations x 1 gene, for both resampling modes and both statistics,
   with the distillation and the treatment model timed separately (the test is given
   them, as ``distillation=`` and ``propensity=``).

Every resampling timing is printed for each repeat (wall clock and the process's CPU
time, whose ratio shows how much of the 2 threads the machine gave), then the best and
the range. With ``--gpu`` the resampling test also runs with ``device="gpu"``.
"""

import argparse
import os
import subprocess
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
import scipy.sparse

from skmixed.offset import (
    NegBinOffsetMean,
    distill,
    make_perturbation_screen,
    resampling_test,
    treatment_probabilities,
)

R_SCRIPT = r"""
suppressPackageStartupMessages(library(MASS))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1]); reps <- as.integer(args[2])
time_it <- function(f) { f(); t <- proc.time()[["elapsed"]]; for (i in seq_len(reps)) f(); (proc.time()[["elapsed"]] - t) / reps }
t_nb <- time_it(function() glm(y ~ 1 + offset(o), family = negative.binomial(2), data = d))
t_nb_small <- time_it(function() glm(y ~ 1 + offset(o), family = negative.binomial(2), data = d[d$t == 1, ]))
t_glmnb <- time_it(function() glm.nb(y ~ 1 + offset(o), data = d))
t_pois <- time_it(function() glm(y ~ 1 + offset(o), family = poisson, data = d))
cat(sprintf("%.9f %.9f %.9f %.9f\n", t_nb, t_nb_small, t_glmnb, t_pois))
"""


def best(f, repeat=5, number=1):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            f()
        times.append((time.perf_counter() - t0) / number)
    return min(times)


def median_time(f, repeat=15):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def one_fit_comparison(reps_r=200):
    rng = np.random.default_rng(0)
    n = 2000
    o = rng.normal(0, 0.5, n)
    y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o)))
    treated = rng.uniform(size=n) < 0.01
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.csv")
        pd.DataFrame({"y": y, "o": o, "t": treated.astype(int)}).to_csv(path, index=False)
        script = os.path.join(tmp, "t.R")
        with open(script, "w") as fh:
            fh.write(R_SCRIPT)
        out = subprocess.run(["Rscript", script, path, str(reps_r)], capture_output=True, text=True, check=True)
    r_nb, r_nb_small, r_glmnb, r_pois = map(float, out.stdout.split())
    X = o[:, None]
    rows = [
        ("R glm(negative.binomial(2)), 2,000 cells", r_nb, None),
        ("R glm(negative.binomial(2)), its 1% treated cells", r_nb_small, None),
        ("R MASS::glm.nb (size estimated)", r_glmnb, None),
        ("R glm(poisson)", r_pois, None),
    ]
    for label, est, ref in [
        ("NegBinOffsetMean(size=2), closed form", NegBinOffsetMean(size=2.0), r_nb),
        ("NegBinOffsetMean(size=2, method='mle')", NegBinOffsetMean(size=2.0, method="mle"), r_nb),
        ("NegBinOffsetMean(method='mle') (size estimated)", NegBinOffsetMean(method="mle"), r_glmnb),
        ("NegBinOffsetMean(family='poisson')", NegBinOffsetMean(family="poisson"), r_pois),
    ]:
        rows.append((label + ", one call", best(lambda est=est: est.fit(X, y), number=20), ref))
    # many fits per call: G = 10 responses x B = 500 weight columns
    Y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o)), size=(10, n)).T.astype(float)
    for density, label in [(1.0, "every cell"), (0.01, "1% of cells")]:
        W = scipy.sparse.random(n, 500, density=density, format="csr", random_state=1)
        W.data[:] = 1.0
        for name, est in [("closed form", NegBinOffsetMean(size=2.0)), ("mle", NegBinOffsetMean(size=2.0, method="mle"))]:
            t = best(lambda est=est, W=W: est.fit(X, Y, sample_weight=W), repeat=3)
            ref = r_nb if density == 1.0 else r_nb_small
            rows.append((f"NegBinOffsetMean {name}, 10 x 500 fits per call, {label}: per fit", t / 5000, ref))
    # issue 14's case: one gene, 200,000 cells, 500 resampled treatment indicators as a CSC
    # matrix, 1% treated (2,000 cells per column: R's 2,000-cell fit is the comparison)
    N = 200_000
    o_big = rng.normal(0, 0.5, N)
    y_big = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o_big))).astype(float)
    W = scipy.sparse.random(N, 500, density=0.01, format="csc", random_state=2)
    W.data[:] = 1.0
    for name, est in [("closed form, size 2", NegBinOffsetMean(size=2.0)),
                      ("closed form, Poisson", NegBinOffsetMean(family="poisson"))]:
        est.fit(o_big[:, None], y_big, sample_weight=W)  # warm-up (compiles the fused passes once)
        t = median_time(lambda est=est: est.fit(o_big[:, None], y_big, sample_weight=W), repeat=15)
        rows.append((f"NegBinOffsetMean {name}, 1 gene x 500 CSC x 200k cells: per fit", t / 500,
                     r_nb if "size" in name else r_pois))
    print("\nOne fit, 2,000 cells (seconds; speed-up against the matching R fit)")
    for label, t, ref in rows:
        speed = f"{ref / t:10.0f}x" if ref else ""
        print(f"  {label:<78s} {t:12.3e} {speed}")


def resampling_benchmark(n_cells, n_jobs, repeat=3, gpu=False, layouts=((100, 10), (1000, 1)),
                         modes=("permutation", "conditional"), statistics=("wald", "score")):
    print(f"\nResampling test: 1,000 pairs, B = 500, {n_cells:,} cells, 1% treated, n_jobs={n_jobs}")
    print(f"  load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    devices = ["cpu"] + (["gpu"] if gpu else [])
    for n_perts, genes_per_pert in layouts:
        G = n_perts * genes_per_pert
        t0 = time.perf_counter()
        counts, treatment, cov, _ = make_perturbation_screen(n_cells, G, n_perts, treated_fraction=0.01, random_state=0)
        t_sim = time.perf_counter() - t0
        pairs = np.column_stack([np.arange(G), np.repeat(np.arange(n_perts), genes_per_pert)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            dist = distill(counts.iloc[:, :100], cov)
            t_dist = (time.perf_counter() - t0) / 100
            t0 = time.perf_counter()
            pi = treatment_probabilities(treatment, cov)
            t_pi = time.perf_counter() - t0
        # the distillation of the other genes: the fitted offsets of the first 100, reused
        reps = -(-G // 100)
        dist.offsets = np.asfortranarray(np.tile(dist.offsets, (1, reps))[:, :G])
        dist.size = np.tile(dist.size, reps)[:G]
        k = treatment.to_numpy().sum(axis=0)
        print(f"  {n_perts} perturbations x {genes_per_pert} genes: treated cells per perturbation "
              f"{int(k.min())}-{int(k.max())} (median {int(np.median(k))})")
        for device in devices:
            for resampling in modes:
                for statistic in statistics:
                    walls, cpus = [], []
                    for _ in range(repeat):
                        t0, c0 = time.perf_counter(), time.process_time()
                        res = resampling_test(counts, treatment, cov, pairs=pairs, n_resamples=500, statistic=statistic,
                                              resampling=resampling, distillation=dist, propensity=pi, n_jobs=n_jobs,
                                              device=device, random_state=0)
                        walls.append(time.perf_counter() - t0)
                        cpus.append(time.process_time() - c0)
                    w = np.array(walls)
                    print(f"    {device} {resampling:11s} {statistic:5s}: best {w.min():6.2f} s, range "
                          f"{w.min():.2f}-{w.max():.2f} s (CPU {min(cpus):.1f}-{max(cpus):.1f} s; "
                          f"{w.min() / (len(res) * 501) * 1e6:.3f} us per fit)", flush=True)
        print(f"    precomputation: distillation {t_dist:.2f} s per gene, treatment model {t_pi:.1f} s "
              f"for {n_perts} perturbations (simulation {t_sim:.0f} s)")
        print(f"  load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="20,000 cells instead of 200,000")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="repeats of each resampling timing")
    parser.add_argument("--gpu", action="store_true", help="also run the resampling test with device='gpu'")
    parser.add_argument("--no-r", action="store_true", help="skip the one-fit comparison with R")
    parser.add_argument("--layout", choices=["both", "100x10", "1000x1"], default="both")
    parser.add_argument("--no-resampling", action="store_true", help="only the one-fit comparison")
    args = parser.parse_args()
    if not args.no_r:
        one_fit_comparison(reps_r=50 if args.quick else 200)
    layouts = {"both": ((100, 10), (1000, 1)), "100x10": ((100, 10),), "1000x1": ((1000, 1),)}[args.layout]
    if not args.no_resampling:
        resampling_benchmark(20_000 if args.quick else 200_000, args.n_jobs, args.repeat, args.gpu, layouts)
