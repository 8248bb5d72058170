"""GLMEIV on each stored reference pair (50,000 cells) in a process of its own: best and median
wall time of ``--repeat`` fits after a warm-up (which also compiles or loads numba's passes).

    python asv_bench/glmeiv_one_pair.py [--repeat 15] [--stages]

The configuration comes from the environment, as for any fit: ``SKMIXED_DISABLE_NUMBA=1``
(the numpy passes alone), ``SKMIXED_NO_MALLOPT=1`` (glibc's allocator defaults).
``--stages`` also reports, per pair, the mean wall time of the fit's stages (the pilot GLMs,
the reduced EM, the full EM, the tidy tables), timed around those functions.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's skmixed, not an installed copy

PAIRS = [("m_pois", "g_15"), ("m_pois", "g_4"), ("m_nb", "g_15"), ("m_nb", "g_4")]


def _timed_stages(acc):
    """Wrap the fit's stages so that each call adds its wall time to ``acc``."""
    import skmixed.eiv._estimator as est
    import skmixed.eiv._fit as fit

    def wrap(owner, name, static=False):
        f = owner.__dict__[name].__func__ if static else getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t

        setattr(owner, name, staticmethod(timed) if static else timed)

    wrap(est.GLMEIV, "_pilot", static=True)
    wrap(fit, "reduced_em")
    wrap(fit, "run_full_em")
    wrap(est.GLMEIV, "_finish")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--stages", action="store_true")
    args = ap.parse_args()
    from skmixed.eiv import GLMEIV

    acc = collections.defaultdict(float)
    if args.stages:
        _timed_stages(acc)
    df = pd.read_csv(ROOT / "tests" / "reference" / "eiv" / "glmeiv_data.csv.gz")
    X = df[["batch"]].astype(float)
    for gene, pert in PAIRS:
        kw = {"grna": df[pert], "offset": np.log(df["lib_m"]), "grna_offset": np.log(df["lib_g"])}
        model = GLMEIV(mrna_family="poisson" if gene == "m_pois" else "negative_binomial", random_state=0)
        model.fit(X, df[gene], **kw)
        acc.clear()
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            model.fit(X, df[gene], **kw)
            times.append(time.perf_counter() - t)
        line = (f"{gene} {pert}: best {1e3 * min(times):.1f} ms, median {1e3 * np.median(times):.1f} ms, "
                f"full-EM steps {model.n_iter_}")
        if args.stages:
            line += "; " + ", ".join(f"{k} {1e3 * v / args.repeat:.2f} ms" for k, v in acc.items())
        print(line)


if __name__ == "__main__":
    main()
