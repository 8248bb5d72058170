"""
Differential expression across the transcriptome with one mixed model per gene
===============================================================================

The seed analysis asks about one gene, ZEB2; a biologist asks the same question of
every gene: is expression in rectal T cells different between patients with
ulcerative colitis and healthy people, once patient-to-patient variation is
accounted for? This example simulates a Boland-like data set
(:func:`skmixed.datasets.make_multipatient_counts`: 68,627 cells, 20 cell groups,
16 patients of whom 7 have colitis, raw UMI counts with negative binomial cell
noise, a planted log fold change in 10% of the genes), fits

``gene ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)``

to every gene at once, tests the contrast "T : R : diseased" minus
"T : R : healthy" with Benjamini-Hochberg q-values, and checks the tests against
the truth: type-I error on the genes without an effect, observed FDR and power.

Disease is a patient-level factor: the contrast compares 7 patients with 9. Its
standard error is dominated by the patient-to-patient variance, estimated from 16
patients, so :class:`~skmixed.PoissonGLMM` by default estimates that variance by
REML and refers the statistic to a t distribution with the between-within degrees
of freedom (16 patients - 2 between-patient parameters = 14); lme4's Wald z (ML
variance, normal reference) is shown beside it. See :ref:`small_sample_inference`.

Run: ``python examples/plot_whole_transcriptome.py [n_genes [n_nb_genes]]`` (default
1,000 genes, the negative binomial GLMM on the first 30 of them, which keeps the
docs build near a minute; ``asv_bench/de_calibration.py`` runs the same comparison
on more genes); the figure is saved next to the script as
``plot_whole_transcriptome.png``.
"""

# %%
import sys
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.stats

from skmixed import PoissonGLMM
from skmixed.datasets import make_multipatient_counts

n_genes = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1000
n_nb = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 30
cells, counts, truth = make_multipatient_counts(n_genes, 68_627, sd_patient=0.2, noise="nb", size=5.0,
                                                frac_de=0.1, random_state=0)
print(f"{counts.shape[0]:,} cells x {counts.shape[1]:,} genes, "
      f"{counts.nnz / np.prod(counts.shape):.1%} non-zero, {truth.de.sum()} genes with a planted effect")
contrast = {"T cells in rectum, UC vs healthy": {"T : R : diseased": 1.0, "T : R : healthy": -1.0}}
X = pd.get_dummies(cells.cell_group, prefix="", prefix_sep="", dtype=float)
offset = np.log(cells.total_count)


def fit(model, Y):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few genes flagged (e.g. no counts in a cell group)
        m = model.fit(X, Y, groups=cells.patient_assignment, offset=offset)
    return m, time.perf_counter() - start


# %%
# One model per gene, vectorised across genes
# -------------------------------------------
# The default: REML variance and the t test with between-within df.
model, seconds = fit(PoissonGLMM(fit_intercept=False), counts)
table = model.contrast(contrast)
print(f"fitted {n_genes:,} genes in {seconds:.1f} s; flags:",
      pd.Series(model.flags_).replace("", "ok").value_counts().to_dict())
print(table[["estimate", "std_error", "statistic", "df", "p_value", "distribution"]].head(3).to_string())
results = {"PoissonGLMM (REML, t)": (table.p_value.to_numpy(), seconds, n_genes)}

# lme4's fit and test, for comparison: ML variance and the Wald z
ml, seconds = fit(PoissonGLMM(fit_intercept=False, reml=False), counts)
results["PoissonGLMM (ML, Wald z)"] = (ml.contrast(contrast, test="z").p_value.to_numpy(), seconds, n_genes)

# %%
# The negative binomial GLMM, on the first ``n_nb`` genes: it cannot sum the cells that
# share their design, as the Poisson model can, so it costs far more per gene
try:
    from skmixed import NegativeBinomialGLMM
except ImportError:
    NegativeBinomialGLMM = None
if NegativeBinomialGLMM is not None:
    k = min(n_nb, n_genes)
    nb, seconds = fit(NegativeBinomialGLMM(fit_intercept=False), counts[:, :k])
    p = np.concatenate([nb.contrast(contrast).p_value.to_numpy(), np.full(n_genes - k, np.nan)])
    results["NegativeBinomialGLMM (default)"] = (p, seconds, k)

# %%
# Pseudobulk: DESeq2 on the per-patient sums of the rectal T cells (PyDESeq2, when
# installed; it is not a dependency of skmixed)
try:
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.ds import DeseqStats
except ImportError:
    DeseqDataSet = None
if DeseqDataSet is not None:
    keep = cells.cell_group.isin(["T : R : diseased", "T : R : healthy"]).to_numpy()
    codes, patients = pd.factorize(cells.patient_assignment[keep], sort=True)
    S = sp.csr_matrix((np.ones(codes.size), (codes, np.flatnonzero(keep))), shape=(patients.size, len(cells)))
    bulk = pd.DataFrame(np.asarray((S @ counts).todense(), dtype=int), index=patients, columns=truth.gene)
    meta = pd.DataFrame({"disease": ["diseased" if p.startswith("U") else "healthy" for p in patients]},
                        index=patients)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=bulk, metadata=meta, design="~disease", quiet=True, n_cpus=1)
        dds.deseq2()
        ds = DeseqStats(dds, contrast=["disease", "diseased", "healthy"], quiet=True, n_cpus=1)
        ds.summary()
    results["pseudobulk PyDESeq2"] = (ds.results_df.pvalue.to_numpy(), time.perf_counter() - start, n_genes)

# %%
# Type-I error, FDR, power and time
# ---------------------------------
# Type-I error: the fraction of genes without an effect with p < 0.05 (target 0.05).
# FDR and power at Benjamini-Hochberg 5% over the genes each method fitted.
de = truth.de.to_numpy()
rows = []
for name, (p, seconds, fitted) in results.items():
    ok = np.isfinite(p)
    q = np.full(p.shape, np.nan)
    q[ok] = scipy.stats.false_discovery_control(p[ok])
    hits = ok & (q < 0.05)
    rows.append({"method": name, "genes": int(ok.sum()),
                 "type-I error": np.mean(p[ok & ~de] < 0.05),
                 "observed FDR": (hits & ~de).sum() / max(hits.sum(), 1),
                 "power": (hits & de).sum() / max((ok & de).sum(), 1),
                 "seconds per 1,000 genes": 1000 * seconds / fitted})
summary = pd.DataFrame(rows).set_index("method")
print(summary.round(3).to_string())

# %%
# QQ plot of the null genes' p-values, and the volcano plot
# ---------------------------------------------------------
# On the QQ plot a calibrated test follows the diagonal; points above it at the right
# are too many small p-values (false discoveries). On the volcano, red genes pass 5%
# FDR with the default test.
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
for name, (p, _, _) in results.items():
    null = np.sort(p[np.isfinite(p) & ~de])
    expected = (np.arange(1, null.size + 1) - 0.5) / null.size
    ax1.plot(-np.log10(expected), -np.log10(np.maximum(null, 1e-300)), ".", ms=3, label=name)
top = -np.log10(0.5 / max((~de).sum(), 1))
ax1.plot([0, top], [0, top], c="0.3", lw=0.8)
ax1.set_xlabel("expected -log10 p (null genes)")
ax1.set_ylabel("observed -log10 p")
ax1.set_title("Null genes: QQ plot")
ax1.legend(frameon=False, fontsize=8)

p = table.p_value.to_numpy()
ok = np.isfinite(p)
hits = table.q_value.to_numpy() < 0.05
ax2.scatter(table.estimate[ok & ~hits], -np.log10(p[ok & ~hits]), s=4, c="0.6", label="q >= 0.05")
ax2.scatter(table.estimate[hits], -np.log10(np.maximum(p[hits], 1e-300)), s=6, c="C3", label="q < 0.05 (5% FDR)")
ax2.axvline(0.0, lw=0.6, c="0.3")
ax2.set_xlabel("log fold change, rectal T cells, UC vs healthy")
ax2.set_ylabel("-log10 p (t, 14 df)")
ax2.set_title(f"{n_genes:,} genes, PoissonGLMM (REML, t)")
ax2.legend(frameon=False, loc="upper left")
fig.tight_layout()
if "__file__" in globals():  # run as a script: keep the figure next to it
    fig.savefig(Path(__file__).with_suffix(".png"), dpi=120)
