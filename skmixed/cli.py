"""The ``skmixed`` console script: argument parsing and printing only.

Three subcommands, each reading an ``.h5ad`` file (AnnData: cells x genes, raw counts
in ``layers["counts"]`` or ``.X``, cell annotations in ``.obs``)::

    skmixed de data.h5ad --formula "~ 0 + cell_group + offset(log(total_count)) + (1 | patient)" \\
        --contrast "UC_vs_healthy = T : R : diseased - T : R : healthy" --out de.csv --plot volcano.png
    skmixed zinbwave data.h5ad -k 10 --batch batch --out out.h5ad
    skmixed screen data.h5ad --treatment grna.csv --covariates log_lib batch --out results.csv

Exit status: 0 on success, 2 for bad arguments (an unknown option, a missing file, a
malformed contrast), 1 for data that cannot be analysed as asked (a formula naming a
column that ``.obs`` lacks, counts that are not integers, ...). Errors are one line on
standard error. Progress bars (tqdm) are on; ``--quiet`` turns them off, ``-v`` adds
log messages.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ._parallel import dask_client

__all__ = ["main", "parse_contrast", "volcano_plot"]

_FORMULA_EXAMPLE = "~ 0 + cell_group + offset(log(total_count)) + (1 | patient)"


class _BadArgument(Exception):
    """A bad command-line argument: exit status 2 (``prog``: the (sub)command's name)."""

    def __init__(self, message, prog=None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message``) and exit status 2."""

    def error(self, message):
        raise _BadArgument(f"{message} (see '{self.prog} --help')", prog=self.prog)


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


# ------------------------------------------------------------------- contrasts
_WEIGHT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*\*\s*")


def parse_contrast(text, coefficients, prefixes=()):
    """A contrast written as ``"[NAME =] term1 - term2"`` as weights on the coefficients.

    Terms are coefficient names (as the formula names them, e.g.
    ``cell_groupT : R : diseased``) or, when unambiguous, a coefficient name without
    the variable's name in front (``T : R : diseased`` for ``cell_group``; the
    variables are ``prefixes``). Each term may carry a sign and a weight
    (``0.5 * a + 0.5 * b - c``). Names are matched longest first, so names that
    contain ``-``, ``+`` or spaces need no quoting. Without ``NAME =`` the contrast
    is named by its text.

    Parameters
    ----------
    text : str
    coefficients : list of str
        The model's coefficient names (``PoissonGLMM.fixed_names_``).
    prefixes : sequence of str, optional
        Variable names that may be left out in front of a coefficient name.

    Returns
    -------
    name : str
    weights : dict
        ``{coefficient: weight}``, as :meth:`skmixed.PoissonGLMM.contrast` takes them.

    Raises
    ------
    ValueError
        Empty text, or a term that is not a coefficient (the message lists them).

    Examples
    --------
    >>> coefs = ["cell_groupT : R : diseased", "cell_groupT : R : healthy", "cell_groupB"]
    >>> parse_contrast("UC = T : R : diseased - T : R : healthy", coefs, ["cell_group"])
    ('UC', {'cell_groupT : R : diseased': 1.0, 'cell_groupT : R : healthy': -1.0})
    >>> parse_contrast("0.5*cell_groupB", coefs)
    ('0.5*cell_groupB', {'cell_groupB': 0.5})
    """
    name, sep, expr = text.partition("=")
    if not sep:
        name, expr = text, text
    name, expr = name.strip(), expr.strip()
    if not name or not expr:
        raise ValueError(f"contrast {text!r} is empty; write it as 'NAME = term1 - term2'.")
    aliases = {c: c for c in coefficients}
    short = {}
    for c in coefficients:
        for p in prefixes:
            if c.startswith(p) and len(c) > len(p):
                short.setdefault(c[len(p):], set()).add(c)
    for s, full in short.items():
        if len(full) == 1 and s not in aliases:
            aliases[s] = next(iter(full))
    candidates = sorted(aliases, key=len, reverse=True)
    weights, i = {}, 0
    while i < len(expr):
        sign = 1.0
        while i < len(expr) and expr[i] in "+- ":
            sign = -sign if expr[i] == "-" else sign
            i += 1
        m = _WEIGHT.match(expr, i)
        weight = 1.0
        if m:
            weight, i = float(m.group(1)), m.end()
        for cand in candidates:
            end = i + len(cand)
            if expr.startswith(cand, i) and (end == len(expr) or expr[end:].lstrip()[:1] in ("+", "-", "")):
                weights[aliases[cand]] = weights.get(aliases[cand], 0.0) + sign * weight
                i = end
                break
        else:
            rest = expr[i:].strip()
            raise ValueError(
                f"contrast {text!r}: {rest!r} does not start with a coefficient of the model; "
                f"its coefficients are {list(coefficients)}."
            )
        while i < len(expr) and expr[i] == " ":
            i += 1
    if not weights:
        raise ValueError(f"contrast {text!r} names no coefficient.")
    return name, weights


# ------------------------------------------------------------------- plotting
def volcano_plot(table, path=None, *, fdr=0.05, title=None, ax=None):
    """Volcano plot of a contrast table: estimate against ``-log10 p``.

    Genes with ``q_value < fdr`` are red; the dashed line marks the largest p-value
    among them (where the Benjamini-Hochberg cut falls).

    Parameters
    ----------
    table : DataFrame
        :meth:`skmixed.PoissonGLMM.contrast` output for one contrast (``estimate``,
        ``p_value``, ``q_value``).
    path : str or Path, optional
        Save the figure there (format from the suffix: .png, .pdf, .svg).
    fdr : float, default=0.05
    title : str, optional
    ax : matplotlib Axes, optional
        Draw into it; otherwise a new figure (no pyplot state is touched).

    Returns
    -------
    ax : matplotlib Axes
    """
    if ax is None:
        from matplotlib.figure import Figure  # noqa: PLC0415

        ax = Figure(figsize=(6.5, 5)).subplots()
    est = table["estimate"].to_numpy(dtype=float)
    p = table["p_value"].to_numpy(dtype=float)
    hits = table["q_value"].to_numpy(dtype=float) < fdr
    ok = np.isfinite(p) & np.isfinite(est)
    y = -np.log10(np.maximum(p, 1e-300))
    ax.scatter(est[ok & ~hits], y[ok & ~hits], s=4, c="0.6", label=f"q >= {fdr:g}")
    ax.scatter(est[ok & hits], y[ok & hits], s=6, c="C3", label=f"q < {fdr:g} ({fdr:.0%} FDR)")
    if (ok & hits).any():
        ax.axhline(-np.log10(p[ok & hits].max()), ls="--", lw=0.8, c="C3")
    ax.axvline(0.0, lw=0.6, c="0.3")
    ax.set_xlabel("log fold change (estimate)")
    ax.set_ylabel("-log10 p")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False, loc="best")
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax


# --------------------------------------------------------------------- reading
def _read_h5ad(path, layer=None, what="DATA", backed=False):
    """The AnnData of ``path`` (``backed``: counts left in the file, read by chunks);
    a missing file or ``layer`` is a bad argument."""
    p = Path(path)
    if not p.is_file():
        raise _BadArgument(f"{what} {str(path)!r}: no such file.")
    try:
        import anndata  # noqa: PLC0415
    except ImportError as exc:  # an install without the cli extra
        raise ValueError("reading .h5ad files needs anndata: pip install 'skmixed[cli]'.") from exc
    try:
        adata = anndata.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many kinds; one line for the user
        raise ValueError(f"cannot read {str(path)!r} as an .h5ad file: {exc}") from exc
    if layer is not None and layer not in adata.layers:
        raise _BadArgument(f"--layer {layer!r} is not a layer of {p.name}; its layers are {list(adata.layers.keys())}.")
    return adata


def _check_out(path, option, suffixes):
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise _BadArgument(f"{option} {str(path)!r} must end in {' or '.join(suffixes)}.")
    if p.parent != Path("") and not p.parent.is_dir():
        raise _BadArgument(f"{option} {str(path)!r}: the folder {str(p.parent)!r} does not exist.")
    return p


def _obs_columns(adata, cols, option):
    missing = [c for c in cols if c not in adata.obs.columns]
    if missing:
        raise ValueError(f"{option}: {missing} not columns of .obs, which has {list(map(str, adata.obs.columns))}.")
    return adata.obs[list(cols)]


def _dummies(frame):
    """Numeric columns as they are; others as indicators (first level dropped)."""
    return pd.get_dummies(frame, drop_first=True, dtype=float).astype(float)


# ------------------------------------------------------------------------- de
def _add_total_count(adata, layer):
    """``obs["total_count"]``, the formulas' library size, when the file has none."""
    from ._inputs import count_source  # noqa: PLC0415

    src = count_source(adata, layer=layer, arg="DATA")
    total = np.asarray(src.values.sum(axis=1), dtype=float).reshape(-1)
    if np.any(total <= 0):
        raise ValueError(
            f"total_count: .obs has no such column, and {int(np.sum(total <= 0)):,} cells have no count over the "
            f"{adata.n_vars:,} genes of {src.where}, so log(total_count) is -inf for them: filter them out "
            "(sc.pp.filter_cells(adata, min_counts=1)) or add a total_count column to .obs."
        )
    adata.obs["total_count"] = total
    print(f"total_count: not a column of .obs; using each cell's total count over the {adata.n_vars:,} genes "
          f"of {src.where}.")


def _run_de(args):
    from .formula import parse_formula, split_formula  # noqa: PLC0415
    from ._inputs import store_contrast  # noqa: PLC0415
    from .mixed import PoissonGLMM  # noqa: PLC0415

    out = _check_out(args.out, "--out", (".csv", ".tsv"))
    plot = None if args.plot is None else _check_out(args.plot, "--plot", (".png", ".pdf", ".svg"))
    h5ad = None if args.h5ad is None else _check_out(args.h5ad, "--h5ad", (".h5ad",))
    if not 0 < args.fdr < 1:
        raise _BadArgument(f"--fdr must lie between 0 and 1, got {args.fdr}.")
    if "~" not in args.formula:
        raise _BadArgument(f"--formula {args.formula!r} has no '~'; e.g. --formula '{_FORMULA_EXAMPLE}'.")
    adata = _read_h5ad(args.data, args.layer, backed=args.backed)
    if re.search(r"\btotal_count\b", args.formula) and "total_count" not in adata.obs.columns:
        _add_total_count(adata, args.layer)
    rhs = args.formula[args.formula.index("~"):]
    try:
        coefs = parse_formula(rhs, adata.obs).fixed_names  # the contrasts are checked before the fit
    except ValueError as exc:
        raise ValueError(f"--formula: {exc} (.obs has columns {list(map(str, adata.obs.columns))})") from exc
    contrasts = {}
    for text in args.contrast:
        try:
            name, weights = parse_contrast(text, coefs, [str(c) for c in adata.obs.columns])
        except ValueError as exc:
            raise _BadArgument(f"--contrast: {exc}") from exc
        if h5ad is not None and "/" in name:
            raise _BadArgument(f"--contrast: the name {name!r} contains '/', which .h5ad keys cannot; "
                               "name it: --contrast 'NAME = ...'.")
        contrasts[name] = weights
    response = split_formula(args.formula)[0]
    start = time.perf_counter()
    model = PoissonGLMM.from_formula(args.formula, adata, layer=args.layer, verbose=int(not args.quiet))
    seconds = time.perf_counter() - start
    table = model.contrast(contrasts)
    if response is None:
        flags = pd.Series(model.flags_, index=model.gene_names_).replace("", "ok")
        table["flag"] = flags.reindex(table["gene"]).to_numpy()
        print(f"Fitted {model.n_genes_:,} genes x {adata.n_obs:,} cells in {seconds:.1f} s; gene flags: "
              f"{flags.value_counts().to_dict()}")
    else:
        table["gene"] = response
        print(f"Fitted {response} on {adata.n_obs:,} cells in {seconds:.1f} s.")
    table.to_csv(out, index=False, sep="\t" if out.suffix.lower() == ".tsv" else ",")
    for name, part in table.groupby("contrast", sort=False):
        hits = part[part.q_value < args.fdr].sort_values("p_value")
        tested = int(np.isfinite(part.p_value).sum())
        print(f"Contrast {name!r}: {tested:,} genes tested, {len(hits):,} at {args.fdr:.0%} FDR "
              f"(Benjamini-Hochberg q < {args.fdr:g}).")
        top = part.sort_values("p_value").head(args.top)[["gene", "estimate", "std_error", "p_value", "q_value"]]
        if len(top):
            with pd.option_context("display.width", 120):
                print(top.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"Table written to {out}")
    if h5ad is not None:
        store_contrast(adata, table.drop(columns="flag", errors="ignore"), key_added=args.key,
                       params={"formula": args.formula, "layer": args.layer})
        adata.write_h5ad(h5ad)
        print(f"Table stored in {h5ad}: uns[{args.key!r}] (as scanpy's rank_genes_groups) and varm[{args.key!r}]")
    if plot is not None:
        first = next(iter(contrasts))
        part = table[table.contrast == first]
        volcano_plot(part, plot, fdr=args.fdr, title=f"{first}: {len(part):,} genes")
        print(f"Volcano plot of {first!r} written to {plot}")
    return 0


# ------------------------------------------------------------------- zinbwave
def _run_zinbwave(args):
    from .zinb import ZINBWaVE  # noqa: PLC0415

    out = _check_out(args.out, "--out", (".h5ad",))
    csv = None if args.csv is None else _check_out(args.csv, "--csv", (".csv",))
    if args.k < 0:
        raise _BadArgument(f"-k/--n-components must be >= 0, got {args.k}.")
    if args.max_iter < 1:
        raise _BadArgument(f"--max-iter must be >= 1, got {args.max_iter}.")
    adata = _read_h5ad(args.data, args.layer, backed=args.backed)
    covariates = None
    if args.batch:
        covariates = _dummies(_obs_columns(adata, args.batch, "--batch").astype("category"))
        covariates.insert(0, "intercept", 1.0)  # zinbwave's X: the intercept is the caller's
    model = ZINBWaVE(n_components=args.k, layer=args.layer, max_iter=args.max_iter,
                     random_state=args.random_state, n_jobs=args.n_jobs, verbose=int(not args.quiet))
    start = time.perf_counter()
    W = model.fit_transform(adata, cell_covariates=None if covariates is None else covariates.to_numpy(),
                            key_added=args.key)
    adata.uns[args.key] = {
        "params": {"n_components": args.k, "layer": args.layer or "", "batch": ",".join(args.batch or []),
                   "max_iter": args.max_iter, "random_state": args.random_state},
        "loglik": model.loglik_, "penalized_loglik": model.penalized_loglik_,
        "n_iter": model.n_iter_, "converged": model.converged_,
    }
    adata.write_h5ad(out)
    status = "converged" if model.converged_ else "not converged (raise --max-iter)"
    print(f"ZINBWaVE, K = {args.k}, on {adata.n_obs:,} cells x {adata.n_vars:,} genes: {status} after "
          f"{model.n_iter_} iterations in {time.perf_counter() - start:.1f} s; penalized log-likelihood "
          f"{model.penalized_loglik_:.6g}.")
    print(f"W written to {out} (obsm[{args.key!r}]; e.g. sc.pp.neighbors(adata, use_rep={args.key!r})).")
    if csv is not None:
        cols = [f"W{j + 1}" for j in range(W.shape[1])]
        pd.DataFrame(W, index=pd.Index(adata.obs_names, name="cell"), columns=cols).to_csv(csv)
        print(f"W written to {csv}")
    return 0


# --------------------------------------------------------------------- screen
def _treatment(args, adata):
    sources = [s for s in (args.treatment, args.treatment_obs, args.treatment_obsm) if s]
    if len(sources) != 1:
        raise _BadArgument("give exactly one of --treatment CSV, --treatment-obs COLUMN..., --treatment-obsm KEY.")
    cells = pd.Index(adata.obs_names.astype(str))
    if args.treatment:
        path = Path(args.treatment)
        if not path.is_file():
            raise _BadArgument(f"--treatment {args.treatment!r}: no such file.")
        T = pd.read_csv(path, index_col=0)
        T.index = T.index.astype(str)
        missing = cells.difference(T.index)
        if len(missing):
            raise ValueError(f"--treatment: {len(missing)} cells of DATA are not rows of {path.name}, "
                             f"e.g. {list(missing[:3])} (its first column must hold the cell names).")
        T = T.loc[cells]
    elif args.treatment_obs:
        T = _obs_columns(adata, args.treatment_obs, "--treatment-obs")
    else:
        if args.treatment_obsm not in adata.obsm:
            raise ValueError(f"--treatment-obsm: {args.treatment_obsm!r} is not an obsm key; the keys are "
                             f"{list(adata.obsm.keys())}.")
        M = adata.obsm[args.treatment_obsm]
        T = M if isinstance(M, pd.DataFrame) else pd.DataFrame(
            M.toarray() if hasattr(M, "toarray") else np.asarray(M),
            columns=[f"{args.treatment_obsm}{j}" for j in range(M.shape[1])])
    try:
        values = T.to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the treatment must be numbers (0/1 or gRNA counts): {exc}") from exc
    if np.isnan(values).any():
        raise ValueError("the treatment has missing values.")
    treated = pd.DataFrame(values >= args.threshold, index=cells, columns=[str(c) for c in T.columns])
    everywhere = treated.columns[treated.all(axis=0).to_numpy()].tolist()
    if everywhere:  # nothing to compare with
        raise ValueError(f"perturbation(s) {everywhere[:5]} are present in every cell (values >= --threshold "
                         f"{args.threshold:g}); is this the right column or threshold?")
    return treated


def _run_screen(args):
    from .mixed._multigene import bh_columns  # noqa: PLC0415
    from .offset import resampling_test  # noqa: PLC0415

    out = _check_out(args.out, "--out", (".csv", ".tsv"))
    if args.n_resamples < 2:
        raise _BadArgument(f"--n-resamples must be >= 2, got {args.n_resamples}.")
    if args.pairs is not None and not Path(args.pairs).is_file():
        raise _BadArgument(f"--pairs {args.pairs!r}: no such file.")
    adata = _read_h5ad(args.data, args.layer, backed=args.backed)
    T = _treatment(args, adata)
    covariates = None if not args.covariates else _dummies(_obs_columns(adata, args.covariates, "--covariates"))
    pairs = None
    if args.pairs is not None:
        pairs = pd.read_csv(args.pairs)
        if pairs.shape[1] < 2:
            raise ValueError(f"--pairs {args.pairs!r} must have two columns: gene, perturbation.")
        pairs = pairs.iloc[:, :2].astype(str).to_numpy(dtype=object)
    res = resampling_test(
        adata, T, covariates, pairs=pairs, n_resamples=args.n_resamples, resampling=args.resampling,
        statistic=args.statistic, family=args.family, layer=args.layer, n_jobs=args.n_jobs,
        random_state=args.random_state, verbose=int(not args.quiet),
    )
    res.insert(res.columns.get_loc("pvalue") + 1, "q_value", bh_columns(res[["pvalue"]].to_numpy())[:, 0])
    res.to_csv(out, index=False, sep="\t" if out.suffix.lower() == ".tsv" else ",")
    tested = int(np.isfinite(res.pvalue).sum())
    hits = res[res.q_value < args.fdr].sort_values("pvalue")
    print(f"Tested {tested:,} of {len(res):,} (gene, perturbation) pairs on {adata.n_obs:,} cells with "
          f"{args.n_resamples} {args.resampling} resamples; {len(hits):,} at {args.fdr:.0%} FDR.")
    top = res.sort_values("pvalue").head(args.top)[["gene", "perturbation", "n_treated", "coef", "pvalue", "q_value"]]
    if len(top):
        print(top.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"Results written to {out}")
    return 0


# --------------------------------------------------------------------- parser
def _common(p):
    p.add_argument("data", metavar="DATA.h5ad", help="AnnData file: cells x genes, raw counts, cell annotations in .obs")
    p.add_argument("--layer", help="layer with the raw counts (default: layers['counts'] if present, else .X)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log messages on standard error")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on Dask: 'local' (worker processes on this machine) "
                   "or a scheduler address tcp://host:8786 (default: in this process)")
    p.add_argument("--backed", action="store_true", help="read the counts from DATA by chunks instead of loading "
                   "them (files larger than memory; with --scheduler the workers read DATA: a shared path)")


def _command(sub, name, help, *, description, epilog):
    """A subcommand with the options every command has (its epilog starts with an example)."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=_formatter)
    _common(p)
    return p


def build_parser():
    """The ``skmixed`` argument parser (subcommands ``de``, ``zinbwave``, ``screen``).

    Examples
    --------
    >>> build_parser().parse_args(["zinbwave", "pbmc.h5ad", "-k", "10", "--out", "z.h5ad"]).k
    10
    """
    from . import __version__  # noqa: PLC0415

    parser = _Parser(
        prog="skmixed",
        description="Mixed models and latent-variable models for single-cell counts, from .h5ad files.",
        epilog="Run 'skmixed COMMAND --help' for each command's options and an example.",
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"skmixed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    de = _command(
        sub, "de", "differential expression: one Poisson GLMM per gene, contrasts, volcano plot",
        description=(
            "Fit one Poisson generalised linear mixed model per gene (lme4's glmer, vectorised across\n"
            "genes) and test contrasts between coefficients, with Benjamini-Hochberg q-values.\n\n"
            "The formula is written as in lme4 without a response: its variables are columns of .obs.\n"
            "One random intercept (1 | group) is allowed; offset(log(total_count)) adjusts for\n"
            "library size (total_count: an .obs column of counts per cell; when .obs has none, each\n"
            "cell's total count over the genes of DATA)."
        ),
        epilog=(
            "example:\n"
            "  skmixed de data.h5ad \\\n"
            f"      --formula '{_FORMULA_EXAMPLE}' \\\n"
            "      --contrast 'UC_vs_healthy = T : R : diseased - T : R : healthy' \\\n"
            "      --out de.csv --plot volcano.png\n\n"
            "contrasts: 'NAME = a - b' compares coefficients a and b (weights: '0.5*a + 0.5*b - c').\n"
            "With '~ 0 + cell_group + ...' the coefficients are the levels of cell_group, written with or\n"
            "without the column name in front ('cell_groupT : R : diseased' or 'T : R : diseased').\n"
            "The output table has one row per gene and contrast: gene, contrast, estimate (natural-log\n"
            "fold change), std_error, z, p_value, q_value, flag ('ok', 'all_zero', 'zero_count_group',\n"
            "'singular', 'not_converged')."
        ),
    )
    de.add_argument("--formula", required=True, help="lme4 formula over .obs columns, e.g. '%s'" % _FORMULA_EXAMPLE)
    de.add_argument("--contrast", action="append", required=True, metavar="'NAME = a - b'",
                    help="contrast to test; repeat for several")
    de.add_argument("--out", required=True, metavar="de.csv", help="output table (.csv or .tsv)")
    de.add_argument("--plot", metavar="volcano.png", help="volcano plot of the first contrast (.png, .pdf, .svg)")
    de.add_argument("--h5ad", metavar="de.h5ad", help="also write a copy of DATA with the table in .uns and .varm")
    de.add_argument("--key", default="skmixed_de", help="the .uns/.varm key of --h5ad (default skmixed_de)")
    de.add_argument("--fdr", type=float, default=0.05, help="false discovery rate for the hits (default 0.05)")
    de.add_argument("--top", type=int, default=10, help="genes to print (default 10)")
    de.set_defaults(run=_run_de)

    zw = _command(
        sub, "zinbwave", "ZINB-WaVE latent factors of the cells, stored in .obsm",
        description=(
            "Fit zinbwave's zero-inflated negative binomial factor model and store the K latent\n"
            "factors of each cell (W) in .obsm, where scanpy finds embeddings. Genes and cells\n"
            "without any count must be filtered out first."
        ),
        epilog=(
            "example:\n"
            "  skmixed zinbwave data.h5ad -k 10 --batch batch --out out.h5ad --csv W.csv\n"
            "then, in Python: sc.pp.neighbors(adata, use_rep='X_zinbwave'); sc.tl.umap(adata)"
        ),
    )
    zw.add_argument("-k", "--n-components", dest="k", type=int, default=2, help="number of latent factors (default 2)")
    zw.add_argument("--batch", nargs="+", metavar="COLUMN", help=".obs column(s) of batches, adjusted for as covariates")
    zw.add_argument("--out", required=True, metavar="out.h5ad", help="copy of DATA with W in .obsm[KEY]")
    zw.add_argument("--csv", metavar="W.csv", help="also write W as a table, one row per cell")
    zw.add_argument("--key", default="X_zinbwave", help="the .obsm key (default X_zinbwave)")
    zw.add_argument("--max-iter", type=int, default=100, help="maximum iterations (default 100)")
    zw.add_argument("--random-state", type=int, default=0, help="seed (default 0)")
    zw.add_argument("--n-jobs", type=int, default=None, help="threads (default 1)")
    zw.set_defaults(run=_run_zinbwave)

    sc = _command(
        sub, "screen", "CRISPR screen: resampling test of (gene, perturbation) pairs (SCEPTRE-style)",
        description=(
            "Test whether each perturbation changes each gene's expression, with SCEPTRE's\n"
            "conditional resampling (or permutations): calibrated p-values for single-cell screens.\n"
            "The treatment (which cells got which perturbation) comes from one of: a CSV file (first\n"
            "column: cell names as in DATA; then one 0/1 or gRNA-count column per perturbation),\n"
            ".obs columns, or an .obsm matrix. Values >= --threshold count as treated."
        ),
        epilog=(
            "example:\n"
            "  skmixed screen data.h5ad --treatment grna.csv --covariates log_lib batch --out results.csv\n\n"
            "The output has one row per pair: gene, perturbation, n_treated, coef, statistic, p-values\n"
            "(pvalue is the one to use), q_value (Benjamini-Hochberg over the pairs tested), flag."
        ),
    )
    src = sc.add_argument_group("treatment (exactly one)")
    src.add_argument("--treatment", metavar="grna.csv", help="CSV of treatment indicators or gRNA counts per cell")
    src.add_argument("--treatment-obs", nargs="+", metavar="COLUMN", help=".obs columns of treatment indicators")
    src.add_argument("--treatment-obsm", metavar="KEY", help=".obsm matrix of treatment indicators or gRNA counts")
    sc.add_argument("--threshold", type=float, default=1.0, help="treated when the value is >= this (default 1)")
    sc.add_argument("--covariates", nargs="+", metavar="COLUMN", help=".obs columns of technical covariates")
    sc.add_argument("--pairs", metavar="pairs.csv", help="CSV of the pairs to test (gene, perturbation); default all")
    sc.add_argument("--out", required=True, metavar="results.csv", help="output table (.csv or .tsv)")
    sc.add_argument("--n-resamples", type=int, default=500, help="resamples per pair (default 500)")
    sc.add_argument("--resampling", choices=["conditional", "permutation"], default="conditional")
    sc.add_argument("--statistic", choices=["wald", "score"], default="wald")
    sc.add_argument("--family", choices=["negative_binomial", "poisson"], default="negative_binomial")
    sc.add_argument("--fdr", type=float, default=0.1, help="false discovery rate for the hits (default 0.1)")
    sc.add_argument("--top", type=int, default=10, help="pairs to print (default 10)")
    sc.add_argument("--random-state", type=int, default=0, help="seed (default 0)")
    sc.add_argument("--n-jobs", type=int, default=1, help="threads (default 1)")
    sc.set_defaults(run=_run_screen)
    return parser


def _warn_line(message):
    print(f"skmixed: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv=None):
    """Run the ``skmixed`` command line; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 for bad arguments, 1 for data that cannot be analysed.

    Examples
    --------
    >>> main(["de", "missing.h5ad", "--formula", "~ x + (1 | g)", "--contrast", "x", "--out", "de.csv"])
    2
    """
    parser = build_parser()
    prog = "skmixed"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        prog = f"skmixed {args.command}"
        if args.scheduler is not None and not (args.scheduler == "local" or "://" in args.scheduler):
            raise _BadArgument(f"--scheduler must be 'local' or an address such as tcp://host:8786, got {args.scheduler!r}.")
        if args.verbose:
            logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
            logging.getLogger("skmixed").setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
        with warnings.catch_warnings(), dask_client(args.scheduler):
            warnings.showwarning = lambda message, *a, **k: _warn_line(message)
            return args.run(args)
    except _BadArgument as exc:
        print(f"{exc.prog or prog}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, NotImplementedError, KeyError, OSError) as exc:
        text = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).split())
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # python -m skmixed.cli
    sys.exit(main())
