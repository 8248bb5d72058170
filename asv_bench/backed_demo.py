"""A many-gene PoissonGLMM or a ZINBWaVE streamed from an .h5ad file, with its peak memory.

    python asv_bench/backed_demo.py [--cells 200000] [--genes 20000] [--dir /tmp] [--keep]
    python asv_bench/backed_demo.py --model zinbwave --genes 1000 [--components 10] [--max-iter 3]

1. Writes ``<dir>/backed_demo.h5ad``: ``cells`` x ``genes`` Poisson counts with a
   random intercept per patient, stored sparse CSC (the layout whose column slices,
   i.e. chunks of genes, are contiguous in the file), float32 values, written a chunk of
   genes at a time so that the writer never holds the matrix either. Cells fall in
   20 cell groups (5 types x 2 tissues x 2 disease states) and 16 patients, as in
   Boland et al. (2020).
2. In a fresh subprocess (so that its peak resident memory is the fit's alone), fits
   ``~ 0 + cell_group + offset(log(total_count)) + (1 | patient)`` to every gene of
   ``anndata.read_h5ad(path, backed="r")``; the counts are read by chunks of
   ``CHUNK_GENES`` genes. Reports the wall-clock time and the peak RSS
   (``ru_maxrss``) of the subprocess next to the dense size of the matrix and the
   machine's memory.
3. Deletes the file unless ``--keep``.

With ``--in-memory`` the subprocess instead reads the whole sparse matrix into memory
first (the non-streaming path), for comparison.

``--model zinbwave`` writes the same counts stored CSR (rows, i.e. chunks of cells,
contiguous in the file; cells or genes without counts dropped, as ZINBWaVE refuses
them) and fits ``ZINBWaVE(n_components=--components, max_iter=--max-iter)``, which
reads the file by chunks of cells in every pass (the initialisation's too). The peak
RSS, not the fit, is the point: a few iterations suffice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

FORMULA = "~ 0 + cell_group + offset(log(total_count)) + (1 | patient)"


def _cells(n, rng):
    groups = [f"{t} : {s} : {d}" for t in ("T", "B", "Myeloid", "Epithelial", "Fibroblast")
              for s in ("PBMC", "R") for d in ("healthy", "diseased")]
    patient = rng.integers(0, 16, n)
    group = rng.integers(0, len(groups), n)
    # 7 patients diseased, 9 healthy: a cell's disease state follows its patient
    group = (group // 2) * 2 + (patient < 7)
    total = rng.lognormal(np.log(2000.0), 0.5, n).round() + 100
    order = np.lexsort((patient, group))  # cells sorted by (group, patient): one contiguous range each
    obs = pd.DataFrame({
        "cell_group": pd.Categorical(np.asarray(groups)[group[order]], categories=groups),
        "patient": pd.Categorical([f"P{p:02d}" for p in patient[order]]),
        "total_count": total[order],
    }, index=[f"cell{i}" for i in range(n)])
    return obs


def _gene_chunk(obs, genes, rng, density):
    """CSC counts of ``genes`` genes: per gene, Poisson counts in each (group, patient)
    cell range drawn in total, then spread over its cells in proportion to total_count."""
    import scipy.sparse as sp  # noqa: PLC0415

    n = len(obs)
    # codes are int8: widen before combining
    combo = obs.cell_group.cat.codes.to_numpy().astype(np.int64) * 16 + obs.patient.cat.codes.to_numpy()
    starts = np.searchsorted(combo, np.arange(20 * 16))
    ends = np.searchsorted(combo, np.arange(20 * 16), side="right")
    cum = np.concatenate([[0.0], np.cumsum(obs.total_count.to_numpy())])
    size = cum[ends] - cum[starts]  # sum of total_count in each range
    # log rate per count unit: gene level, cell-group effect, patient random intercept
    base = np.log(-np.log1p(-density) / obs.total_count.mean()) + rng.normal(-0.5, 1.0, (genes, 1))
    group_eff = rng.normal(0, 0.5, (genes, 20))
    patient_eff = rng.normal(0, 0.4, (genes, 16))
    eta = base + np.repeat(group_eff, 16, axis=1) + np.tile(patient_eff, 20)
    lam = np.exp(eta) * size  # (genes, combos)
    N = rng.poisson(lam)
    gene = np.repeat(np.repeat(np.arange(genes), lam.shape[1]), N.ravel())
    k = np.repeat(np.tile(np.arange(lam.shape[1]), genes), N.ravel())
    u = cum[starts[k]] + rng.uniform(size=gene.size) * size[k]
    cell = np.minimum(np.searchsorted(cum, u, side="right") - 1, n - 1)
    keys, values = np.unique(gene.astype(np.int64) * n + cell, return_counts=True)
    g, c = np.divmod(keys, n)
    indptr = np.zeros(genes + 1, np.int64)
    np.cumsum(np.bincount(g, minlength=genes), out=indptr[1:])
    return sp.csc_matrix((values.astype(np.float32), c.astype(np.int32), indptr), shape=(n, genes))


def write(path, n_cells, n_genes, density=0.05, chunk=1000, seed=0):
    import anndata  # noqa: PLC0415
    import h5py  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    obs = _cells(n_cells, rng)
    var = pd.DataFrame(index=[f"gene{j:05d}" for j in range(n_genes)])
    first = _gene_chunk(obs, min(chunk, n_genes), rng, density)
    anndata.AnnData(first, obs=obs, var=var.iloc[:first.shape[1]]).write_h5ad(path)
    nnz = first.nnz
    with h5py.File(path, "a") as f:
        X = anndata.io.sparse_dataset(f["X"])
        for start in range(first.shape[1], n_genes, chunk):
            block = _gene_chunk(obs, min(chunk, n_genes - start), rng, density)
            X.append(block)
            nnz += block.nnz
        del f["var"]
        anndata.io.write_elem(f, "var", var)
    return nnz


def write_csr(path, n_cells, n_genes, density=0.05, chunk=1000, seed=0):
    """The counts of :func:`write` stored CSR, without empty cells or genes."""
    import anndata  # noqa: PLC0415
    import scipy.sparse as sp  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    obs = _cells(n_cells, rng)
    X = sp.hstack([_gene_chunk(obs, min(chunk, n_genes - s), rng, density) for s in range(0, n_genes, chunk)]).tocsr()
    cells = np.diff(X.indptr) > 0
    genes = np.bincount(X.indices, minlength=n_genes) > 0
    X = X[cells][:, genes]
    var = pd.DataFrame(index=[f"gene{j:05d}" for j in np.flatnonzero(genes)])
    anndata.AnnData(X, obs=obs[cells], var=var).write_h5ad(path)
    return X.nnz


def fit(path, in_memory=False, model="glmm", components=10, max_iter=3):
    import warnings  # noqa: PLC0415

    import anndata  # noqa: PLC0415

    from skmixed import PoissonGLMM, ZINBWaVE  # noqa: PLC0415

    start = time.perf_counter()
    adata = anndata.read_h5ad(path, backed=None if in_memory else "r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model == "zinbwave":
            est = ZINBWaVE(n_components=components, max_iter=max_iter, random_state=0).fit(adata)
            out = {"genes": int(est.n_features_in_), "objective": est.objective_history_}
        else:
            est = PoissonGLMM.from_formula(FORMULA, adata)
            flags = pd.Series(est.flags_).replace("", "ok").value_counts().to_dict()
            out = {"genes": int(est.n_genes_), "flags": {str(k): int(v) for k, v in flags.items()}}
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu.ru_utime + cpu.ru_stime,
                      "peak_rss_gib": peak_kib / 2**20, **out}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.05, help="target fraction of non-zero counts")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the .h5ad file")
    parser.add_argument("--in-memory", action="store_true", help="read the whole matrix first (comparison)")
    parser.add_argument("--model", choices=("glmm", "zinbwave"), default="glmm")
    parser.add_argument("--components", type=int, default=10, help="ZINBWaVE's n_components")
    parser.add_argument("--max-iter", type=int, default=3, help="ZINBWaVE's max_iter")
    parser.add_argument("--fit-only", metavar="PATH", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    model_args = [args.model, args.components, args.max_iter]
    if args.fit_only:
        fit(args.fit_only, args.in_memory, *model_args)
        return
    path = Path(args.dir) / f"backed_demo_{args.model}.h5ad"
    try:
        if not path.exists():
            t = time.perf_counter()
            writer = write_csr if args.model == "zinbwave" else write
            nnz = writer(path, args.cells, args.genes, args.density)
            print(f"wrote {path}: {args.cells:,} x {args.genes:,}, {nnz:,} non-zero "
                  f"({nnz / (args.cells * args.genes):.1%}), {path.stat().st_size / 2**30:.2f} GiB on disk, "
                  f"in {time.perf_counter() - t:.0f} s", flush=True)
        cmd = [sys.executable, __file__, "--fit-only", str(path), "--model", args.model, "--components",
               str(args.components), "--max-iter", str(args.max_iter)] + (["--in-memory"] if args.in_memory else [])
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        dense = args.cells * args.genes * 8 / 2**30
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        extra = f"flags {out['flags']}" if args.model == "glmm" else f"objective path {out['objective']}"
        print(f"{'in-memory' if args.in_memory else 'backed'} {args.model} fit of {out['genes']:,} genes: "
              f"{out['seconds']:.0f} s ({out['cpu_seconds']:.0f} s CPU), peak RSS {out['peak_rss_gib']:.2f} GiB "
              f"(dense float64 matrix {dense:.1f} GiB; machine {ram:.1f} GiB, {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}); {extra}")
    finally:
        if not args.keep and path.exists():
            path.unlink()


if __name__ == "__main__":
    main()
