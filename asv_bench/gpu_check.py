"""Everything a lent GPU should run, in one call: the GPU tests and the GPU benchmarks.

On the GPU machine, from the repository root (it has CuPy, numpy, scipy, scikit-learn,
pandas, formulaic, pytest and hypothesis; the repository runs from its copy)::

    PYTHONPATH=. python3 asv_bench/gpu_check.py            # about 8 minutes at most

writes ``doc/benchmarks_gpu.rst`` (commit it) and prints the same table. Each step runs
in its own process with a time limit taken from what is left of ``--budget`` seconds,
so one slow step cannot starve the tests; a step that runs out of time is reported as
such. Steps, in order of importance:

1. ``pytest -m gpu tests``: numpy == CuPy for every estimator with a GPU path;
2. ``many_genes``: PoissonGLMM, 20,000 genes x 68,627 cells (CuPy sparse counts);
3. ``offset``: NegBinOffsetMean, 10 genes x 500 sparse weight columns x 200,000 cells;
4. ``resampling``: resampling_test, 1,000 pairs x 500 resamples x 200,000 cells;
5. ``glmeiv``: GLMEIV, 1,000 pairs x 200,000 cells (1% perturbed), ``device="gpu"``;
6. ``zinbwave``: ZINBWaVE, 1,000,000 cells x 1,000 genes, K = 10, zinbwave's stopping
   rule (``tol=1e-4``).

On a machine without CUDA, ``--dry-run`` runs the same steps on tiny data with numpy,
which checks the script itself (tests/test_benchmark_suite.py does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (full size, dry-run size) of each step
SIZES = {
    "many_genes": ({"genes": 20_000, "cells": 68_627}, {"genes": 60, "cells": 3_000}),
    "offset": ({"cells": 200_000, "genes": 10, "columns": 500}, {"cells": 3_000, "genes": 3, "columns": 20}),
    "resampling": ({"cells": 200_000, "pairs": 1_000, "resamples": 500}, {"cells": 3_000, "pairs": 20, "resamples": 49}),
    "glmeiv": ({"cells": 200_000, "pairs": 1_000}, {"cells": 3_000, "pairs": 5}),
    "zinbwave": ({"cells": 1_000_000, "genes": 1_000, "K": 10}, {"cells": 400, "genes": 80, "K": 2}),
}


# ----------------------------------------------------------------------- steps
def _xp(dry):
    if dry:
        import numpy as xp  # noqa: PLC0415

        return xp, None
    import cupy as xp  # noqa: PLC0415
    import cupyx.scipy.sparse as xsp  # noqa: PLC0415

    return xp, xsp


def _sync(xp):
    if xp.__name__ == "cupy":
        xp.cuda.Device().synchronize()


def step_many_genes(size, dry):
    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    from skmixed import PoissonGLMM  # noqa: PLC0415
    from skmixed.datasets import make_boland_like_counts  # noqa: PLC0415

    xp, xsp = _xp(dry)
    cells, counts, _ = make_boland_like_counts(size["genes"], size["cells"], random_state=0)
    X = pd.get_dummies(cells.cell_group, prefix="cell_group", prefix_sep="", dtype=float)
    Y = counts if dry else xsp.csc_matrix(counts)
    off = np.log(cells.total_count.to_numpy())
    fit = lambda Y_: PoissonGLMM(fit_intercept=False).fit(X, Y_, groups=cells.patient_assignment, offset=off)  # noqa: E731
    fit(Y[:, :20])  # warm-up: CUDA context, kernel compilation
    t0 = time.perf_counter()
    model = fit(Y)
    _sync(xp)
    seconds = time.perf_counter() - t0
    flags = pd.Series(model.flags_).replace("", "ok").value_counts().to_dict()
    return seconds, f"{size['genes']:,} genes x {size['cells']:,} cells; flags {flags}"


def step_offset(size, dry):
    import numpy as np  # noqa: PLC0415
    import scipy.sparse  # noqa: PLC0415

    from skmixed.offset import NegBinOffsetMean  # noqa: PLC0415

    xp, xsp = _xp(dry)
    rng = np.random.default_rng(0)
    n, G, B = size["cells"], size["genes"], size["columns"]
    o = rng.normal(0.0, 0.5, n)
    Y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(0.2 + o))[:, None], size=(n, G)).astype(float)
    W = scipy.sparse.random(n, B, density=0.01, format="csr", random_state=0, dtype=float)
    W.data[:] = 1.0
    X = o[:, None]
    if not dry:
        X, Y, W = xp.asarray(X), xp.asarray(Y), xsp.csr_matrix(W)
    model = NegBinOffsetMean(size=2.0)
    model.fit(X, Y, sample_weight=W)  # warm-up
    t0 = time.perf_counter()
    model.fit(X, Y, sample_weight=W)
    _sync(xp)
    seconds = time.perf_counter() - t0
    return seconds, f"{G} genes x {B} weight columns (1% non-zero) x {n:,} cells: {1e6 * seconds / (G * B):.1f} us per fit"


def step_resampling(size, dry):
    import numpy as np  # noqa: PLC0415

    from skmixed.offset import distill, make_perturbation_screen, resampling_test, treatment_probabilities  # noqa: PLC0415

    K, n = size["pairs"], size["cells"]
    P = max(1, K // 10)
    counts, treatment, cov, _ = make_perturbation_screen(n, K, P, treated_fraction=0.01, random_state=0)
    pairs = np.column_stack([np.arange(K), np.repeat(np.arange(P), K // P)])
    dist, pi = distill(counts, cov), treatment_probabilities(treatment, cov)
    device = "cpu" if dry else "gpu"
    kw = dict(pairs=pairs, n_resamples=size["resamples"], distillation=dist, propensity=pi, device=device,
              random_state=0)
    resampling_test(counts, treatment, cov, **{**kw, "pairs": pairs[:10]})  # warm-up
    t0 = time.perf_counter()
    res = resampling_test(counts, treatment, cov, **kw)
    seconds = time.perf_counter() - t0
    return seconds, (f"{K:,} pairs ({P} perturbations) x {size['resamples']} resamples x {n:,} cells, "
                     f"conditional Wald; {int(res.pvalue.notna().sum())} pairs tested")


def step_glmeiv(size, dry):
    from skmixed.eiv import GLMEIV, make_glmeiv_data  # noqa: PLC0415

    K, n = size["pairs"], size["cells"]
    X, m, g, off, _ = make_glmeiv_data(n, K, pi=0.01, mrna_size=20.0, random_state=1)
    model = GLMEIV(device="cpu" if dry else "gpu", random_state=0)
    pairs = [(j, j) for j in range(K)]
    fit = lambda P: model.fit(X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"], pairs=P)  # noqa: E731
    fit(pairs[:2])  # warm-up
    t0 = time.perf_counter()
    fit(pairs)
    seconds = time.perf_counter() - t0
    return seconds, f"{K:,} pairs x {n:,} cells (1% perturbed), NB mRNA; {int(model.pairs_.converged.sum())} converged, {int(model.pairs_.flagged.sum())} flagged"


def step_zinbwave(size, dry):
    import scipy.sparse  # noqa: PLC0415

    from skmixed import ZINBWaVE  # noqa: PLC0415
    from skmixed.datasets import make_zinb_counts  # noqa: PLC0415

    xp, xsp = _xp(dry)
    n, J, K = size["cells"], size["genes"], size["K"]
    block = min(n, 100_000)
    sim = make_zinb_counts(block, J, n_clusters=8, n_latent=K, random_state=0)
    Y = scipy.sparse.vstack([sim.counts] * (n // block), format="csr")  # 1M cells: the 100k simulation x 10
    Y = Y[:, (Y.getnnz(axis=0) > 0)]
    if not dry:
        Y = xsp.csr_matrix(Y)
    t0 = time.perf_counter()
    model = ZINBWaVE(K, tol=1e-4, random_state=0).fit(Y)
    _sync(xp)
    seconds = time.perf_counter() - t0
    return seconds, (f"{n:,} cells x {Y.shape[1]:,} genes, K = {K}, tol 1e-4: {model.n_iter_} iterations, "
                     f"penalised log-likelihood {model.penalized_loglik_:.6g}")


STEPS = {"many_genes": step_many_genes, "offset": step_offset, "resampling": step_resampling,
         "glmeiv": step_glmeiv, "zinbwave": step_zinbwave}


# ------------------------------------------------------------------- driver
def _run(cmd, timeout, env):
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, "time limit"
    return out, time.perf_counter() - t0, None


def _gpu_name(dry):
    if dry:
        return "none (dry run on the CPU, numpy)"
    try:
        import cupy  # noqa: PLC0415

        props = cupy.cuda.runtime.getDeviceProperties(0)
        return f"{props['name'].decode()}, CuPy {cupy.__version__}"
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return f"unavailable ({exc})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for everything (default 470)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on numpy: checks the script on a CPU")
    ap.add_argument("--out", default=str(ROOT / "doc" / "benchmarks_gpu.rst"))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # internal: one step
    args = ap.parse_args(argv)
    if args.step:
        seconds, detail = STEPS[args.step](SIZES[args.step][args.dry_run], args.dry_run)
        print("RESULT " + json.dumps({"seconds": seconds, "detail": detail}))
        return 0

    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    left = lambda: args.budget - (time.perf_counter() - start)  # noqa: E731
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
        out, sec, err = _run(cmd, min(left(), 150.0), env)
        summary = err or (out.stdout.strip().splitlines() or ["no output"])[-1]
        rows.append(("pytest -m gpu tests", sec, summary))
        print(f"[gpu_check] tests: {summary} ({sec:.0f} s)", flush=True)
    for name in STEPS:
        if left() < 10:
            rows.append((name, 0.0, "skipped: budget spent"))
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name] + (["--dry-run"] if args.dry_run else [])
        out, sec, err = _run(cmd, left(), env)
        if err:
            rows.append((name, sec, f"did not finish: {err} after {sec:.0f} s"))
        elif out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or ["?"])[-1]
            rows.append((name, sec, f"failed: {tail}"))
        else:
            res = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
            rows.append((name, res["seconds"], res["detail"]))
        print(f"[gpu_check] {name}: {rows[-1][2]} ({rows[-1][1]:.1f} s)", flush=True)

    lines = [
        ".. This file is generated by asv_bench/gpu_check.py; do not edit by hand.",
        "",
        f"GPU: {_gpu_name(args.dry_run)}. Host: {platform.machine()}, {os.cpu_count()} logical CPUs. "
        f"Date {datetime.date.today().isoformat()}. Whole check: {time.perf_counter() - start:.0f} s.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - step",
        "     - seconds",
        "     - what",
    ]
    for name, sec, detail in rows:
        lines += [f"   * - {name}", f"     - {sec:.2f}", f"     - {detail}"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
