"""A whole SCEPTRE-style screen, end to end, timed stage by stage (issue 14).

    python asv_bench/screen_end_to_end.py                      # 1/10 of Gasperini's size
    python asv_bench/screen_end_to_end.py --scale 1            # the full size (2,000 genes,
                                                               # 6,600 perturbations, 100,000 pairs)
    python asv_bench/screen_end_to_end.py --scale 0.01 --cells 20000 --write ""   # a quick check

Gasperini et al. (2019) at full size: 200,000 cells, 2,000 genes, 6,600 perturbations and
100,000 gene-perturbation pairs (each perturbation tested against ~15 nearby genes). ``--scale``
multiplies genes, perturbations and pairs (not cells: a pair's cost depends on its treated
cells, which stay 1% of 200,000). The stages are those a user runs:

1. ``distill(counts, covariates)``: the per-gene NB GLM on the technical covariates (size
   estimated as ``MASS::glm.nb`` does), all genes batched;
2. ``treatment_probabilities(treatment, covariates)``: one logistic regression per
   perturbation, batched;
3. ``resampling_test(..., distillation=, propensity=)``: the conditional-resampling test of
   every pair with ``--resamples`` resamples (default 500, as SCEPTRE) and the ``--statistic``
   (default the score statistic), ``n_jobs=--threads``.

The whole analysis is one call, as a user runs it: ``resampling_test(counts, treatment,
covariates, pairs=pairs)``, which distils the genes by chunks and fits the treatment models by
rounds of perturbations (no (cells x perturbations) matrix of probabilities is held). The stages
are timed inside that call (wall and CPU seconds spent in ``distill`` and in the treatment
fits; the tests are the rest). Simulation is not timed. The peak resident memory of the
analysis (``VmHWM`` reset after the simulation) and of the whole process are reported.
The table (with the extrapolation to the full size when ``--scale`` < 1, linear in genes /
perturbations / pairs) is printed and written to ``doc/benchmarks_screen.rst`` (``--write``).
Full size takes about 9 GB for the analysis (int64 counts 3.2 GB, distillation offsets
3.2 GB, the boolean treatment matrix 1.3 GB, the resampled statistics 0.4 GB).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # time this checkout's skmixed, not an installed copy
FULL = {"genes": 2000, "perturbations": 6600, "pairs": 100_000}


def cis_pairs(n_genes, n_perts, n_pairs, rng):
    """Each perturbation against a run of consecutive genes (its 'neighbourhood'), the
    runs of equal length up to one, starting at random genes: ``n_pairs`` distinct pairs."""
    per = np.full(n_perts, n_pairs // n_perts)
    per[: n_pairs - per.sum()] += 1
    if per.max() > n_genes:
        raise ValueError("more pairs per perturbation than genes")
    start = rng.integers(0, n_genes, n_perts)
    gi = np.concatenate([(s + np.arange(k)) % n_genes for s, k in zip(start, per)])
    pj = np.repeat(np.arange(n_perts), per)
    return np.column_stack([gi, pj])


class StageClock:
    """Wall and CPU seconds spent inside the functions wrapped by :meth:`wrap` (the
    process's CPU time: the stages do not overlap)."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def wrap(self, module, name, label):
        fn = getattr(module, name)

        def timed_fn(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[label] = self.wall.get(label, 0.0) + time.perf_counter() - t
                self.cpu[label] = self.cpu.get(label, 0.0) + time.process_time() - c

        setattr(module, name, timed_fn)


def peak_rss_gib(field="VmHWM"):
    """Peak resident memory (GiB) of this process since start or the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: VmHWM restarts from the current resident size
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.1, help="fraction of Gasperini's genes, perturbations, pairs")
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--resamples", type=int, default=500)
    ap.add_argument("--statistic", choices=["wald", "score"], default="score")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--treated-fraction", type=float, default=0.01)
    ap.add_argument("--write", default=str(ROOT / "doc" / "benchmarks_screen.rst"), help="RST page ('' : none)")
    args = ap.parse_args()

    import skmixed.offset._distill as resampling_module
    import skmixed.offset._stream as stream_module
    from skmixed.offset import make_perturbation_screen, resampling_test

    size = {k: max(1, round(v * args.scale)) for k, v in FULL.items()}
    n = args.cells
    print(f"screen: {n:,} cells, {size['genes']:,} genes, {size['perturbations']:,} perturbations, "
          f"{size['pairs']:,} pairs, B = {args.resamples}, {args.statistic} statistic, {args.threads} threads")
    t = time.perf_counter()
    counts, treatment, cov, _ = make_perturbation_screen(
        n, size["genes"], size["perturbations"], treated_fraction=args.treated_fraction, random_state=0)
    pairs = cis_pairs(size["genes"], size["perturbations"], size["pairs"], np.random.default_rng(1))
    print(f"  simulation (not timed) {time.perf_counter() - t:.1f} s; treated cells per perturbation: median "
          f"{int(np.median(treatment.to_numpy().sum(axis=0)))}; peak RSS so far {peak_rss_gib():.1f} GiB", flush=True)
    clock = StageClock()
    clock.wrap(resampling_module, "distill", "distillation (per gene, batched)")
    clock.wrap(stream_module, "treatment_chunks", "treatment models (per perturbation, batched)")
    sim_peak = peak_rss_gib()
    reset = reset_peak_rss()
    rss0 = peak_rss_gib("VmRSS")
    load0 = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = resampling_test(counts, treatment, cov, pairs=pairs, n_resamples=args.resamples,
                              statistic=args.statistic, n_jobs=args.threads, random_state=0)
    total, total_cpu = time.perf_counter() - t, time.process_time() - c
    peak = peak_rss_gib() if reset else float("nan")
    rows = [(label, clock.wall.get(label, 0.0), clock.cpu.get(label, 0.0)) for label in
            ("distillation (per gene, batched)", "treatment models (per perturbation, batched)")]
    rows.append(("resampling tests", total - sum(r[1] for r in rows), total_cpu - sum(r[2] for r in rows)))
    rows.append(("total", total, total_cpu))
    for label, wall, cpu in rows:
        print(f"  {label:<46s} {wall:8.1f} s wall {cpu:8.1f} s CPU", flush=True)
    memory = {"before": rss0, "analysis": peak, "process": max(sim_peak, peak if reset else _maxrss_gib())}
    print(f"  pairs tested {int((res['flag'] == '').sum()):,}; skew-normal p-values used for "
          f"{float(res['skewnorm_ok'].mean()):.0%}; load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"  memory: {rss0:.1f} GiB resident before the analysis (the data), peak {peak:.1f} GiB during it; "
          f"process peak (simulation included) {memory['process']:.1f} GiB")
    factors = [FULL["genes"] / size["genes"], FULL["perturbations"] / size["perturbations"],
               FULL["pairs"] / size["pairs"]]
    extrap = [r[1] * f for r, f in zip(rows[:3], factors)]
    if args.scale < 1:
        print(f"  extrapolated to the full size (linear): {sum(extrap):.0f} s = {sum(extrap) / 60:.1f} min")
    if args.write:
        write_page(Path(args.write), args, size, rows, extrap, load0, memory)


def _maxrss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_page(path, args, size, rows, extrap, load0, memory):
    scaled = args.scale < 1
    lines = [
        "A whole screen, end to end",
        "==========================",
        "",
        "``python asv_bench/screen_end_to_end.py`` times a SCEPTRE-style screen as a user runs it: one call",
        "``resampling_test(counts, treatment, covariates, pairs=pairs)``, which runs the per-gene",
        "distillation GLM (NB, size estimated; genes read and fitted by chunks), the per-perturbation",
        "logistic treatment models (fitted by rounds of perturbations, each round's pairs tested before",
        "the next is fitted) and the conditional-resampling test of every pair. The stages are timed",
        "inside the call. Gasperini et al.'s screen has 200,000 cells, 2,000 genes, 6,600",
        "perturbations and 100,000 pairs; the goal (issue 14) is the whole analysis in under 10 minutes",
        "on 2 cores.",
        "",
        (f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} cores "
         f"(load average {load0:.1f} before the run; above 0.5, other work was running or had just ended),"),
        (f"{args.cells:,} cells, {size['genes']:,} genes, {size['perturbations']:,} perturbations, "
         f"{size['pairs']:,} pairs (each perturbation against ~15 consecutive genes), "
         f"{args.treated_fraction:.0%} of cells treated per perturbation, B = {args.resamples} resamples, "
         f"{args.statistic} statistic, ``n_jobs={args.threads}``:"),
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - stage",
        "     - wall (s)",
        "     - CPU (s)",
    ]
    if scaled:
        lines.append("     - extrapolated to the full size (s)")
    for i, (label, wall, cpu) in enumerate(rows):
        lines += [f"   * - {label}", f"     - {wall:.1f}", f"     - {cpu:.1f}"]
        if scaled:
            lines.append(f"     - {extrap[i]:.0f}" if i < 3 else f"     - {sum(extrap):.0f}")
    lines += [
        "",
        f"Memory: {memory['before']:.1f} GiB resident before the analysis (the simulated counts, treatment",
        f"and covariates), a peak of {memory['analysis']:.1f} GiB during it (``VmHWM``, reset after the",
        f"simulation); the process's peak, simulation included, {memory['process']:.1f} GiB.",
        "``resampling_test`` keeps the counts of the genes in pairs (here the caller's int64 matrix,",
        "used in place; otherwise an int32 copy read a chunk of genes at a time, from the file for a",
        "backed AnnData) and their float64 offsets, but no (cells x perturbations) float matrix: the",
        "treatment probabilities of one round of perturbations (at most 2^26 values, 512 MiB) exist at",
        "a time, where holding them all would take 200,000 x 6,600 x 8 bytes = 10.6 GB. The chunks and",
        "rounds do not change the results (to the last digit; ``tests/test_offset_resampling.py``).",
        "",
    ]
    if scaled:
        lines += [
            f"This run is {args.scale:g} of the full size in genes, perturbations and pairs (the cells are",
            "the full 200,000, so each pair costs what it costs at full size); the last column scales each",
            "stage linearly (distillation by genes, treatment models by perturbations, tests by pairs). It is",
            "an extrapolation, not a measurement: ``--scale 1`` measures the full size.",
            "",
        ]
    path.write_text("\n".join(lines))
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
