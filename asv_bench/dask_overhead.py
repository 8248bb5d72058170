"""The cost of the Dask engine against in-process on the same work, on this machine.

    python asv_bench/dask_overhead.py [--repeats 3]

Two jobs, each run in-process (``n_jobs=1``, and 2 threads) and on a
``LocalCluster`` of 2 worker processes with one thread each (started once, before the
timings; its start-up time is reported apart), interleaved, ``--repeats`` times; the
median wall-clock time of each is printed, with the check that the results are equal:

- many-gene PoissonGLMM: 2,000 genes x 68,627 Boland-like cells (sparse, about 10%
  non-zero), ``~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)``;
- ``resampling_test``: 1,000 pairs (100 perturbations x 10 genes) x 500 conditional
  resamples on 50,000 cells.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

FORMULA = "~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import anndata  # noqa: PLC0415
    from distributed import Client  # noqa: PLC0415

    from skmixed import PoissonGLMM  # noqa: PLC0415
    from skmixed._parallel import local_cluster, parallel_config  # noqa: PLC0415
    from skmixed.datasets import make_boland_like_counts  # noqa: PLC0415
    from skmixed.offset import make_perturbation_screen, resampling_test  # noqa: PLC0415

    warnings.simplefilter("ignore")
    cells, counts, truth = make_boland_like_counts(n_genes=2000, random_state=0)
    cells.index = cells.index.astype(str)
    adata = anndata.AnnData(counts.tocsc(), obs=cells, var=pd.DataFrame(index=truth.gene.to_numpy()))
    Y, T, C, _ = make_perturbation_screen(50_000, 10, 100, random_state=0)
    pairs = [(g, p) for p in T.columns for g in Y.columns]

    jobs = {
        # PoissonGLMM takes its threads from parallel_config, resampling_test from n_jobs
        "PoissonGLMM, 2,000 genes x 68,627 cells": lambda n_jobs: PoissonGLMM.from_formula(FORMULA, adata).coef_,
        "resampling_test, 1,000 pairs x 500 resamples x 50,000 cells": lambda n_jobs: resampling_test(
            Y, T, C, pairs=pairs, n_resamples=500, random_state=0, n_jobs=n_jobs).pvalue.to_numpy(),
    }
    t = time.perf_counter()
    cluster = local_cluster(2)  # LocalCluster(n_workers=2, threads_per_worker=1), without the malloc setting
    client = Client(cluster)
    print(f"LocalCluster(2 worker processes x 1 thread) started in {time.perf_counter() - t:.1f} s")
    engines = {
        "in-process, 1 thread": dict(n_jobs=1),
        "in-process, 2 threads": dict(n_jobs=2),
        "LocalCluster, 2 workers": dict(client=client),
    }
    try:
        for job, run in jobs.items():
            times = {e: [] for e in engines}
            results = {}
            for _ in range(args.repeats):
                for engine, cfg in engines.items():
                    with parallel_config(**cfg):
                        start = time.perf_counter()
                        results[engine] = run(cfg.get("n_jobs", 1))
                        times[engine].append(time.perf_counter() - start)
            ref = results["in-process, 1 thread"]
            print(job)
            for engine in engines:
                same = np.allclose(results[engine], ref, rtol=1e-10, atol=0, equal_nan=True)
                print(f"  {engine:26s} median {np.median(times[engine]):6.2f} s  "
                      f"(runs {', '.join(f'{v:.2f}' for v in times[engine])}); equal to 1e-10: {same}")
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
