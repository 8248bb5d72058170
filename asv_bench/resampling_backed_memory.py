"""Peak memory of ``resampling_test`` streamed from a backed ``.h5ad`` against the same
test on the AnnData read into memory.

    python asv_bench/resampling_backed_memory.py [--cells 20000] [--genes 2000 4000]
        [--resampling permutation] [--resamples 199] [--dir /tmp]

For each number of genes: writes a screen (``make_perturbation_screen``, 1% of cells
treated per perturbation, one perturbation per 8 genes and its 8 neighbouring genes as
cis pairs) as a CSC ``.h5ad`` (gene chunks contiguous in the file), then runs, each in a
fresh subprocess so that its peak resident memory (``VmHWM``) is the test's alone,
``resampling_test`` on ``anndata.read_h5ad(path, backed="r")`` (genes read, distilled
and tested by chunks) and on ``anndata.read_h5ad(path)`` (the whole matrix in memory,
every gene in ``pairs`` held); the two result tables are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def write(path, n_cells, n_genes, seed=0):
    import anndata  # noqa: PLC0415
    import scipy.sparse as sp  # noqa: PLC0415

    from skmixed.offset import make_perturbation_screen  # noqa: PLC0415

    P = n_genes // 8
    counts, treatment, cov, _ = make_perturbation_screen(n_cells, n_genes, P, treated_fraction=0.01,
                                                         random_state=seed)
    cells = [f"c{i}" for i in range(n_cells)]
    X = sp.csc_matrix(counts.to_numpy(dtype=np.float32))
    anndata.AnnData(X, obs=cov.set_axis(cells), var=pd.DataFrame(index=counts.columns)).write_h5ad(path)
    treatment.set_axis(cells).to_pickle(path.with_suffix(".treatment.pkl"))
    pairs = [(f"gene{g}", f"pert{p}") for p in range(P) for g in range(8 * p, 8 * p + 8)]
    pd.DataFrame(pairs, columns=["gene", "perturbation"]).to_csv(path.with_suffix(".pairs.csv"), index=False)
    return X.nnz


def _vm_hwm_gib():
    """The process's peak resident memory since its exec (``ru_maxrss`` would also count
    the forked copy of the parent, which holds the simulated screen)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def run(path, backed, resampling, resamples, out):
    import warnings  # noqa: PLC0415

    import anndata  # noqa: PLC0415

    from skmixed.offset import resampling_test  # noqa: PLC0415

    path = Path(path)
    treatment = pd.read_pickle(path.with_suffix(".treatment.pkl"))
    pairs = pd.read_csv(path.with_suffix(".pairs.csv")).to_numpy(dtype=object)
    t, c = time.perf_counter(), time.process_time()
    adata = anndata.read_h5ad(path, backed="r" if backed else None)
    cov = adata.obs[["log_lib", "batch"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = resampling_test(adata, treatment, cov, pairs=pairs, n_resamples=resamples, resampling=resampling,
                              random_state=0)
    res.to_pickle(out)
    print(json.dumps({"backed": backed, "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                      "peak_rss_gib": _vm_hwm_gib(),
                      "pairs": len(res), "tested": int(np.isfinite(res.pvalue).sum())}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--genes", type=int, nargs="+", default=[2000, 4000])
    ap.add_argument("--resampling", choices=["conditional", "permutation"], default="permutation")
    ap.add_argument("--resamples", type=int, default=199)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--run", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        run(args.run[0], args.run[1] == "backed", args.resampling, args.resamples, args.out)
        return
    for G in args.genes:
        path = Path(args.dir) / f"resampling_memory_{args.cells}x{G}.h5ad"
        nnz = write(path, args.cells, G)
        tables = {}
        for mode in ("backed", "memory"):
            out = path.with_suffix(f".{mode}.pkl")
            r = subprocess.run([sys.executable, __file__, "--run", str(path), mode, "--out", str(out),
                                "--resampling", args.resampling, "--resamples", str(args.resamples)],
                               capture_output=True, text=True, check=True)
            rec = json.loads(r.stdout.strip().splitlines()[-1])
            rec.update(cells=args.cells, genes=G, nnz=nnz, load=os.getloadavg()[0], resampling=args.resampling)
            print(json.dumps(rec), flush=True)
            tables[mode] = pd.read_pickle(out)
            out.unlink()
        same = tables["backed"].equals(tables["memory"])
        print(json.dumps({"genes": G, "backed_equals_memory": bool(same)}), flush=True)
        for suffix in (".h5ad", ".treatment.pkl", ".pairs.csv"):
            path.with_suffix(suffix).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
