"""Calibration of differential-expression tests on the 16-patient Boland-like design.

Simulates cells with :func:`skmixed.datasets.make_multipatient_counts` (16 patients,
7 with colitis; Poisson or negative binomial (size 5) cell noise; patient SDs 0.1 to
0.6) and tests two contrasts per gene:

* between patients: rectal T cells, colitis vs healthy (disease is a patient-level
  factor, 7 vs 9 patients);
* within patients: rectal vs blood T cells of the 9 healthy patients.

Each setting (noise, patient SD) is simulated ``--reps`` times (3 by default); the
type-I errors are pooled over those data sets with their binomial standard errors, the
FDR averaged over the planted data sets, and every data set is listed: one data set of
2,000 genes has a binomial SE of 0.005, enough for a single column to land 2-3 SE from
its expectation. The seeds are fixed by the setting and replicate number.

Methods: the cell-level ``PoissonGLMM`` with its default inference (REML and the t
test with between-within df) and with lme4's (ML and the Wald z);
``NegativeBinomialGLMM`` when importable; and pseudobulk (per-patient sums of the
same cells) with PyDESeq2, and, through ``Rscript asv_bench/de_calibration.R``,
edgeR quasi-likelihood and limma-voom. On null data it reports the fraction of
genes with p < 0.05 (type-I error); on data with planted effects (10% of genes per
contrast, log fold changes N(0, 1)) the power and observed FDR at BH 5%; and the
wall time of each method.

PyDESeq2 is used here only (``pip install pydeseq2``), never by the package.

Run from the repository root::

    python asv_bench/de_calibration.py                    # 24 data sets of 2,000 genes x 20,000 cells
    python asv_bench/de_calibration.py --genes 500 --cells 5000 --sds 0.3 --reps 2 --out /tmp/x.rst
    # one setting, many data sets (no planted effects):
    python asv_bench/de_calibration.py --noise nb --sds 0.1 --reps 10 --nb-genes 1000 --no-planted --out /tmp/nb01.rst

and it writes ``doc/benchmarks_de_calibration.rst``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's skmixed, not an installed copy

from skmixed import PoissonGLMM
from skmixed.datasets import make_multipatient_counts

BETWEEN = ("T : R : diseased", "T : R : healthy")
WITHIN = ("T : R : healthy", "T : PBMC : healthy")
CONTRASTS = {"between": {BETWEEN[0]: 1.0, BETWEEN[1]: -1.0}, "within": {WITHIN[0]: 1.0, WITHIN[1]: -1.0}}


def nb_glmm_class():
    try:
        from skmixed import NegativeBinomialGLMM  # noqa: PLC0415
    except ImportError:
        try:  # not exported yet: the module itself
            from skmixed.mixed._nbglmm import NegativeBinomialGLMM  # noqa: PLC0415
        except ImportError:
            return None
    return NegativeBinomialGLMM


# -- cell-level mixed models -------------------------------------------------------
def fit_glmm(model, cells, counts):
    X = pd.get_dummies(cells.cell_group, prefix="", prefix_sep="", dtype=float)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = model.fit(X, counts, groups=cells.patient_assignment, offset=np.log(cells.total_count))
    return m, time.perf_counter() - start


def glmm_pvalues(m, test):
    tab = m.contrast(CONTRASTS, test=test)
    return {c: part.p_value.to_numpy() for c, part in tab.groupby("contrast", sort=False)}


# -- pseudobulk ------------------------------------------------------------------------
def pseudobulk(cells, counts):
    """Per-patient sums of the cells of each analysis: (counts genes x samples, samples)."""
    out = {}
    for analysis, (ga, gb) in (("between", BETWEEN), ("within", WITHIN)):
        keep = cells.cell_group.isin([ga, gb]).to_numpy()
        key = (cells.patient_assignment.astype(str) + "|" + cells.cell_group.astype(str)).to_numpy()
        codes, samples = pd.factorize(key[keep], sort=True)
        S = sp.csr_matrix((np.ones(codes.size), (codes, np.flatnonzero(keep))), shape=(samples.size, len(cells)))
        summed = np.asarray((S @ counts).todense()).T  # genes x samples
        patient = [s.split("|")[0] for s in samples]
        group_label = [s.split("|")[1] for s in samples]
        if analysis == "between":
            group = ["diseased" if g == ga else "healthy" for g in group_label]
        else:
            group = ["rectum" if g == ga else "blood" for g in group_label]
        lib = S @ cells.total_count.to_numpy(dtype=float)
        meta = pd.DataFrame({"sample": samples, "patient": patient, "group": group, "lib_size": lib})
        out[analysis] = (summed, meta)
    return out


def pydeseq2_pvalues(bulk):
    from pydeseq2.dds import DeseqDataSet  # noqa: PLC0415
    from pydeseq2.ds import DeseqStats  # noqa: PLC0415

    pv, seconds = {}, 0.0
    for analysis, (summed, meta) in bulk.items():
        counts = pd.DataFrame(summed.T.astype(int), index=meta["sample"].to_numpy(),
                              columns=[f"g{j}" for j in range(summed.shape[0])])
        md = meta.set_index("sample")[["patient", "group"]]
        design = "~group" if analysis == "between" else "~patient + group"
        ref = "healthy" if analysis == "between" else "blood"
        alt = "diseased" if analysis == "between" else "rectum"
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dds = DeseqDataSet(counts=counts, metadata=md, design=design, quiet=True, n_cpus=1)
            dds.deseq2()
            ds = DeseqStats(dds, contrast=["group", alt, ref], quiet=True, n_cpus=1)
            ds.summary()
        seconds += time.perf_counter() - start
        pv[analysis] = ds.results_df["pvalue"].to_numpy()
    return pv, seconds


def r_pvalues(bulk):
    """edgeR QL and limma-voom p-values through Rscript; None where R is missing."""
    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for analysis, (summed, meta) in bulk.items():
            pd.DataFrame(summed, index=[f"g{j}" for j in range(summed.shape[0])],
                         columns=meta["sample"]).to_csv(Path(tmp) / f"{analysis}_counts.csv")
            meta.to_csv(Path(tmp) / f"{analysis}_samples.csv", index=False)
        run = subprocess.run(["Rscript", str(Path(__file__).with_suffix(".R")), tmp], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"de_calibration.R failed:\n{run.stderr}")
        times = pd.read_csv(Path(tmp) / "times.csv").groupby("method").seconds.sum()
        out = {}
        for method, tag in (("edgeR QL", "edgeR"), ("limma-voom", "limma")):
            pv = {a: pd.read_csv(Path(tmp) / f"{a}_{tag}.csv").p_value.to_numpy() for a in bulk}
            out[f"pseudobulk {method}"] = (pv, float(times[method]))
        versions = (Path(tmp) / "versions.txt").read_text().strip()
    return out, versions


# -- one data set, every method --------------------------------------------------------
def run_methods(cells, counts, nb_cls, with_r=True, nb_genes=None):
    """{method: ({contrast: p-values}, seconds)}; the NB GLMM on the first ``nb_genes``
    genes only (NaN p-values for the others; its time scaled to every gene)."""
    res = {}
    m, sec = fit_glmm(PoissonGLMM(fit_intercept=False), cells, counts)
    res["PoissonGLMM (REML, t)"] = (glmm_pvalues(m, "t"), sec)
    m, sec = fit_glmm(PoissonGLMM(fit_intercept=False, reml=False), cells, counts)
    res["PoissonGLMM (ML, Wald z)"] = (glmm_pvalues(m, "z"), sec)
    if nb_cls is not None:
        k = counts.shape[1] if nb_genes is None else min(nb_genes, counts.shape[1])
        m, sec = fit_glmm(nb_cls(fit_intercept=False), cells, counts[:, :k])
        pv = {c: np.concatenate([p, np.full(counts.shape[1] - k, np.nan)]) for c, p in glmm_pvalues(m, "t").items()}
        res["NegativeBinomialGLMM (default)"] = (pv, sec * counts.shape[1] / k)
    bulk = pseudobulk(cells, counts)
    res["pseudobulk PyDESeq2"] = pydeseq2_pvalues(bulk)
    versions = ""
    if with_r:
        r = r_pvalues(bulk)
        if r is not None:
            extra, versions = r
            res.update(extra)
    return res, versions


def rejection_rate(p):
    p = p[np.isfinite(p)]
    return float(np.mean(p < 0.05)) if p.size else np.nan


def expression_quartiles(counts):
    """Quartile (0 lowest .. 3) of each gene's mean count per cell, within the data set."""
    mean = np.asarray(counts.mean(axis=0)).ravel()
    return np.asarray(pd.qcut(pd.Series(mean).rank(method="first"), 4, labels=False))


def dataset_seed(*setting):
    """The seed of one simulated data set, fixed by its setting and replicate number
    (not by the options' order): every data set the run simulates is reported."""
    return zlib.crc32(" ".join(map(str, setting)).encode())


def null_records(res, noise, sd, rep, quartile):
    """Long table of the null p-values of one data set: one row per method, contrast
    and gene (NaN where a method left a gene out)."""
    rows = []
    for method, (pv, _) in res.items():
        for c in ("between", "within"):
            rows.append(pd.DataFrame({"method": method, "noise": noise, "sd": sd, "rep": rep, "contrast": c,
                                      "quartile": quartile, "p": pv[c]}))
    return rows


def power_fdr(p, truth):
    """Power, false discoveries and discoveries at BH 5% over the genes with a p-value
    (the NB GLMM's subset, genes a method left out)."""
    ok = np.isfinite(p)
    q = np.ones_like(p)
    q[ok] = scipy.stats.false_discovery_control(p[ok], method="bh")
    hits = ok & (q < 0.05)
    return {"true": int(np.sum(hits & truth)), "de": int(np.sum(ok & truth)),
            "false": int(np.sum(hits & ~truth)), "hits": int(np.sum(hits))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--sds", type=float, nargs="+", default=[0.1, 0.3, 0.6])
    ap.add_argument("--noise", nargs="+", default=["poisson", "nb"])
    ap.add_argument("--reps", type=int, default=3, help="simulated data sets per setting (null and planted)")
    ap.add_argument("--planted-sd", type=float, default=0.3, help="patient SD of the data with planted effects")
    ap.add_argument("--no-planted", action="store_true", help="null data sets only (no power / FDR table)")
    ap.add_argument("--no-null", action="store_true", help="planted data sets only (for a run to --merge)")
    ap.add_argument("--no-r", action="store_true", help="skip edgeR and limma")
    ap.add_argument("--no-nb", action="store_true", help="skip NegativeBinomialGLMM")
    ap.add_argument("--nb-genes", type=int, default=None,
                    help="genes given to NegativeBinomialGLMM (the first ones; default: all)")
    ap.add_argument("--out", default=str(ROOT / "doc" / "benchmarks_de_calibration.rst"))
    ap.add_argument("--save", help="also keep this run's results in a pickle, for --merge")
    ap.add_argument("--merge", nargs="+", metavar="PICKLE",
                    help="write the page from runs saved with --save (say, the settings run side by side)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    if args.merge:
        return merge(args.merge, args.out)
    nb_cls = None if args.no_nb else nb_glmm_class()
    # the options that shape the page (not where it or the pickle is written), for its first line
    shown = list(sys.argv[1:] if argv is None else argv)
    for opt in ("--out", "--save"):
        if opt in shown:
            del shown[shown.index(opt):shown.index(opt) + 2]
    run = {"load_start": os.getloadavg()[0], "start": time.perf_counter(), "argv": shown}

    null, planted, times = [], [], {}
    versions = ""
    for noise in args.noise:
        for sd in [] if args.no_null else args.sds:
            for rep in range(args.reps):
                seed = dataset_seed("null", noise, sd, rep)
                cells, counts, _ = make_multipatient_counts(args.genes, args.cells, sd_patient=sd, noise=noise,
                                                            frac_de=0.0, frac_de_within=0.0, random_state=seed)
                res, v = run_methods(cells, counts, nb_cls, with_r=not args.no_r, nb_genes=args.nb_genes)
                versions = v or versions
                null += null_records(res, noise, sd, rep, expression_quartiles(counts))
                for method, (_, sec) in res.items():
                    times.setdefault(method, []).append(sec)
                save(args, null, planted, times, versions, nb_cls, run)
                print(f"null {noise} sd={sd:g} data set {rep + 1}: " + "; ".join(
                    f"{m}: {rejection_rate(pv['between']):.3f}/{rejection_rate(pv['within']):.3f} {sec:.1f}s"
                    for m, (pv, sec) in res.items()), flush=True)
        for rep in range(0 if args.no_planted else args.reps):
            seed = dataset_seed("planted", noise, args.planted_sd, rep)
            cells, counts, truth = make_multipatient_counts(args.genes, args.cells, sd_patient=args.planted_sd,
                                                            noise=noise, frac_de=0.1, frac_de_within=0.1,
                                                            random_state=seed)
            res, _ = run_methods(cells, counts, nb_cls, with_r=not args.no_r, nb_genes=args.nb_genes)
            for method, (pv, sec) in res.items():
                for c, de in (("between", truth.de.to_numpy()), ("within", truth.de_within.to_numpy())):
                    planted.append({"method": method, "noise": noise, "rep": rep, "contrast": c,
                                    **power_fdr(pv[c], de)})
                times.setdefault(method, []).append(sec)
            save(args, null, planted, times, versions, nb_cls, run)
            print(f"planted {noise} data set {rep + 1} done", flush=True)
    run.update(load_end=os.getloadavg()[0], seconds=time.perf_counter() - run["start"])
    save(args, null, planted, times, versions, nb_cls, run)
    if not null:
        print(f"no null data sets: no page (the results are in {args.save})")
        return
    write_report(args, null_table(null), pd.DataFrame(planted), times, versions, nb_cls is not None, [run])


def null_table(records):
    if not records:
        return pd.DataFrame(columns=["method", "noise", "sd", "rep", "contrast", "quartile", "p"])
    return pd.concat(records, ignore_index=True).dropna(subset=["p"])


def save(args, null, planted, times, versions, nb_cls, run):
    """Keep what is done so far in ``--save``'s pickle (after every data set, so that a
    long run stopped early still leaves its finished data sets to --merge)."""
    if not args.save:
        return
    run.update(load_end=os.getloadavg()[0], seconds=time.perf_counter() - run["start"])
    with open(args.save, "wb") as f:
        pickle.dump({"args": vars(args), "null": null_table(null),
                     "planted": pd.DataFrame(planted), "times": times, "versions": versions,
                     "have_nb": nb_cls is not None, "run": run}, f)


def merge(paths, out):
    """One page from runs saved with ``--save`` (same genes, cells, data sets per
    setting and planted SD; their noises and patient SDs are pooled)."""
    parts = []
    for path in paths:
        with open(path, "rb") as f:
            parts.append(pickle.load(f))
    first = parts[0]["args"]
    for part in parts[1:]:
        for key in ("genes", "cells", "reps", "planted_sd", "nb_genes"):
            if part["args"][key] != first[key]:
                raise ValueError(f"--merge: the runs differ in {key}: {first[key]} and {part['args'][key]}.")
    noises = [n for n in ("poisson", "nb") if any(n in p["args"]["noise"] for p in parts)]
    sds = sorted({sd for p in parts for sd in p["args"]["sds"]})
    planted = pd.concat([p["planted"] for p in parts], ignore_index=True)
    args = argparse.Namespace(**{**first, "noise": noises, "sds": sds, "out": out, "no_planted": planted.empty})
    times = {}
    for p in parts:
        for method, secs in p["times"].items():
            times.setdefault(method, []).extend(secs)
    null = pd.concat([p["null"] for p in parts if len(p["null"])], ignore_index=True)
    versions = next((p["versions"] for p in parts if p["versions"]), "")
    write_report(args, null, planted, times, versions, all(p["have_nb"] for p in parts), [p["run"] for p in parts])


# -- report ------------------------------------------------------------------------------------
NOISE = {"poisson": "Pois", "nb": "NB"}


def rst_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    rows = [[str(i)] + [str(v) for v in r] for i, r in zip(df.index, df.to_numpy())]
    head = [df.index.name or ""] + cols
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = "  ".join("=" * w for w in widths)
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([line, fmt(head), line, *[fmt(r) for r in rows], line])


def rate_se(p, level=0.05):
    """Pooled rejection rate and its binomial standard error (genes are independent
    given the cells), as "0.050 (0.003)"."""
    r, n = float(np.mean(p < level)), p.size
    return f"{r:.3f} ({np.sqrt(max(r * (1 - r), 1e-12) / n):.3f})"


def type1_tables(null, methods):
    """Per column (noise, SD, contrast); pooled over SDs (at 5% and 1%); by expression
    quartile (within patients); every data set."""
    by = lambda df, keys: df.groupby(keys, sort=False).p
    col = lambda n, sd, c: f"{NOISE[n]} {sd:g} {c[0]}"
    t1 = by(null, ["method", "noise", "sd", "contrast"]).apply(rate_se).reset_index()
    t1["column"] = [col(n, sd, c) for n, sd, c in zip(t1.noise, t1.sd, t1.contrast)]
    t1 = t1.pivot(index="method", columns="column", values="p").reindex(index=methods, columns=t1.column.unique())
    pooled = {}
    for (n, c), part in null.groupby(["noise", "contrast"], sort=False):
        for level in (0.05, 0.01):
            name = f"{NOISE[n]} {c[0]}, p < {level:g}"
            pooled[name] = by(part, "method").apply(lambda p, lv=level: rate_se(p.to_numpy(), lv))
    pooled = pd.DataFrame(pooled).reindex(methods)
    pooled = [pooled[[k for k in pooled if k.endswith(f"p < {lv:g}")]] for lv in (0.05, 0.01)]
    w = null[null.contrast == "within"]
    quart = {f"{NOISE[n]} w Q{q + 1}": by(part, "method").apply(lambda p: f"{np.mean(p < 0.05):.3f}")
             for (n, q), part in w.groupby(["noise", "quartile"], sort=True)}
    order = [k for n in null.noise.unique() for k in quart if k.startswith(NOISE[n] + " ")]
    quart = pd.DataFrame(quart)[order].reindex(methods)
    each = by(null, ["noise", "sd", "contrast", "rep", "method"]).apply(lambda p: f"{np.mean(p < 0.05):.3f}")
    each = each.unstack("method").reindex(columns=methods)
    each.index = [f"{col(n, sd, c)}, data set {rep + 1}" for n, sd, c, rep in each.index]
    each.index.name = "column, data set"
    return t1, pooled, quart, each


def power_table(planted, methods):
    """Power (pooled), FDR (mean false discovery proportion over the data sets, its SE)
    and false / all discoveries summed over the data sets."""
    out = {}
    for (n, c), part in planted.groupby(["noise", "contrast"], sort=False):
        cells = {}
        for m, d in part.groupby("method", sort=False):
            fdp = d["false"] / np.maximum(d.hits, 1)
            se = fdp.std(ddof=1) / np.sqrt(len(fdp)) if len(fdp) > 1 else np.nan
            cells[m] = f"{d.true.sum() / max(d.de.sum(), 1):.2f} / {fdp.mean():.3f} ({se:.3f}) {d['false'].sum()}/{d.hits.sum()}"
        out[f"{'NB' if n == 'nb' else 'Poisson'} {c}"] = pd.Series(cells)
    return pd.DataFrame(out).reindex(methods)


def worst(null, contrast):
    """The largest pooled type-I error of a column (noise, SD) for the contrast: (rate, SE, method, column)."""
    g = null[null.contrast == contrast].groupby(["method", "noise", "sd"]).p
    r = g.apply(lambda p: np.mean(p < 0.05))
    m, n, sd = r.idxmax()
    return r.max(), np.sqrt(r.max() * (1 - r.max()) / g.size()[(m, n, sd)]), m, f"{NOISE[n]} {sd:g}"


def run_lines(runs):
    """The commands behind the page and the machine's load while they ran."""
    cmd = lambda r: " ".join(["``python asv_bench/de_calibration.py", *r["argv"]]) + "``"
    if len(runs) == 1:
        r = runs[0]
        return cmd(r), (f"load average {r['load_start']:.2f} when the run started and {r['load_end']:.2f} when "
                        f"it ended; {r['seconds'] / 60:.1f} min for the whole page")
    loads = [x for r in runs for x in (r["load_start"], r["load_end"])]
    longest = max(r["seconds"] for r in runs) / 60
    load = f"load average {min(loads):.2f} to {max(loads):.2f} at their starts and ends; the longest took {longest:.1f} min"
    return f"{len(runs)} runs side by side, merged with ``--merge``: " + "; ".join(cmd(r) for r in runs), load


def write_report(args, null, planted, times, versions, have_nb, runs):
    methods = list(times)
    commands, machine = run_lines(runs)
    t1, pooled, quart, each = type1_tables(null, methods)
    named = lambda df: df.rename_axis("method")
    tm = pd.DataFrame({"median s per data set": [f"{np.median(times[m]):.2f}" for m in methods],
                       "per 1,000 genes": [f"{1000 * np.median(times[m]) / args.genes:.2f}" for m in methods]},
                      index=pd.Index(methods, name="method"))
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    n_null = len(null.groupby(["noise", "sd", "rep"]))
    n_planted = len(planted.groupby(["noise", "rep"])) if len(planted) else 0
    nb_k = args.genes if args.nb_genes is None else min(args.nb_genes, args.genes)
    nb_n = nb_k * args.reps
    wb, wb_se, wb_m, wb_c = worst(null, "between")
    ww, ww_se, ww_m, ww_c = worst(null, "within")
    power_part = "" if args.no_planted else f"""
Power and observed FDR
----------------------

{n_planted // len(args.noise)} data sets per noise, each with 10% of genes with a between-patient effect and
10% (others) with a within-patient one, log fold changes N(0, 1), patient SD {args.planted_sd:g}:
power (true discoveries / genes with an effect, pooled over the data sets) / observed FDR
(the false discovery proportion at Benjamini-Hochberg 5%, averaged over the data sets: the FDR is
its expectation; in brackets the SE over the data sets), then false / all discoveries summed
over the data sets.

{rst_table(named(power_table(planted, methods)))}
"""
    text = f""".. _benchmarks_de_calibration:

Calibration of differential-expression tests (type-I error, power, FDR)
=========================================================================

Written by {commands} (simulation, every method, this page); pseudobulk edgeR / limma-voom
through ``asv_bench/de_calibration.R``.

Conditions: {args.genes:,} genes x {args.cells:,} cells per data set,
:func:`skmixed.datasets.make_multipatient_counts` (the 16-patient Boland-like design,
7 patients with colitis, 20 cell groups, about 10% non-zero counts), cell noise
Poisson or negative binomial with size 5 (NB); patient SDs {", ".join(f"{s:g}" for s in args.sds)}.
{args.reps} independent data sets (cells and genes) per setting, {n_null} null and {n_planted} with
planted effects, every one simulated reported: each data set's seed is fixed by its setting and
replicate number, never chosen after the fact.
Contrasts: *between* patients, rectal T cells of patients with colitis vs healthy ones
(disease is a patient-level factor: 7 vs 9 patients); *within* patients, rectal vs blood
T cells of the 9 healthy patients. Cell-level models:
``gene ~ 0 + cell_group + offset(log(total_count)) + (1 | patient)``; pseudobulk: sums per
patient and cell group, ``~ group`` (between) or ``~ patient + group`` (within), library
sizes = summed total counts (edgeR, limma) or DESeq2's size factors (PyDESeq2).
{"NegativeBinomialGLMM was not importable: its rows are missing." if not have_nb else
 "NegativeBinomialGLMM is fitted to every gene." if nb_k == args.genes else
 f"NegativeBinomialGLMM is fitted to the first {nb_k:,} genes of each data set "
 f"({nb_n:,} genes per column; its time is scaled to all genes)."}
Machine: {cpu}; {machine}.
{versions}

Type-I error
------------

Fraction of null genes (no effect in either contrast) with p < 0.05, pooled over the
{args.reps} data sets of each noise, patient SD and contrast (b: between, w: within), with its
binomial standard error in brackets ({args.reps * args.genes:,} genes per column:
{np.sqrt(0.05 * 0.95 / (args.reps * args.genes)):.4f} at 5%{f"; {nb_n:,} for NegativeBinomialGLMM: {np.sqrt(0.05 * 0.95 / nb_n):.4f}" if have_nb and nb_k < args.genes else ""}).
The target is 0.05 (at most 0.06).

{rst_table(named(t1))}

Pooled over the patient SDs ({len(args.sds) * args.reps} data sets per noise), at p < 0.05 and, for the
tail of the QQ plot, p < 0.01 (targets 0.05 and 0.01):

{rst_table(named(pooled[0]))}

{rst_table(named(pooled[1]))}

Within-patient rejection rate at p < 0.05 by the gene's expression (quartiles of the mean
count per cell within each data set, Q1 lowest), pooled over the patient SDs and data sets:

{rst_table(named(quart))}
{power_part}
Time
----

Wall time per data set (both contrasts; the mixed models fit all 20 cell groups once).

{rst_table(tm)}

Reading the tables
------------------

* The largest pooled type-I error of a column is {wb:.3f} (SE {wb_se:.3f}; {wb_m}, column {wb_c})
  between patients and {ww:.3f} (SE {ww_se:.3f}; {ww_m}, column {ww_c}) within patients.
* The Wald z of lme4 (ML variance, normal reference) rejects too often between patients:
  the patient variance is estimated from 16 patients, ML's is biased low and the normal
  reference ignores its uncertainty. PoissonGLMM's default (REML variance, t with the
  between-within df: 16 patients - 2 between-patient parameters = 14) holds the level
  between patients, slightly conservatively.
* A data set's rate scatters about the pooled one by the binomial SE of {args.genes:,} genes
  ({np.sqrt(0.05 * 0.95 / args.genes):.4f}), and every method moves with it because they all test the same
  genes' noise (see "Every data set" below): among the dozens of data-set columns one 2-3 SE
  off is expected. A single data set's rate is not a calibration figure; the pooled one is.
* With negative binomial cell noise a Poisson GLMM has no term for the cells'
  overdispersion: its within-patient contrast, which rests on the cells, is
  anticonservative for the highly expressed genes, where the extra variance
  ``mu^2 / size`` matters (the quartile table). NegativeBinomialGLMM models it (REML and the
  same t test by default).
* Benjamini-Hochberg bounds the FDR, the *expected* false discovery proportion (by 5% times
  the fraction of null genes); one data set's proportion, out of some tens of discoveries,
  scatters widely about it, hence the average over data sets and its SE.
* edgeR's quasi-likelihood and limma's moderated t borrow the dispersion information of
  all genes (empirical Bayes); a per-gene t with 14 df does not, which is where their
  extra power between patients comes from.

Every data set
--------------

Type-I error at p < 0.05 of each data set.

{rst_table(each)}
"""
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
