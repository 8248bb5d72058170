"""Parse lme4-style mixed-model formulas into design matrices.

The fixed-effects part of a formula is handed to :mod:`formulaic`; the
random-effects bars ``(expr | group)`` / ``(expr || group)`` and ``offset()``
terms are parsed here.  Names follow lme4's conventions: ``(Intercept)``,
treatment-coded factors glued to their level (``YEAR96``), interactions joined
by ``:``.  Function terms keep formulaic's name (``scale(x)``, ``log(x)``,
``I(x^2)``: ``^`` inside a call is evaluated as ``**`` and printed back as
``^``).  ``factor(x)`` is an alias of formulaic's ``C(x)``.  Logical columns
are coded as R factors with levels ``FALSE``/``TRUE``.
"""

from __future__ import annotations

import itertools
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from formulaic import Formula, model_matrix
from formulaic.errors import DataMismatchWarning, FormulaicError
from formulaic.model_spec import ModelSpec
from formulaic.transforms import TRANSFORMS
from .mixed._design import RandomTerm

__all__ = ["RandomTerm", "ParsedFormula", "parse_formula", "split_formula"]

_CONTEXT: dict[str, Any] = {
    "np": np, "log": np.log, "exp": np.exp, "sqrt": np.sqrt, "abs": np.abs,
    "log1p": np.log1p, "factor": TRANSFORMS["C"],
}


@dataclass
class _TermSpec:
    """What is needed to rebuild one random term on new data."""

    group: str
    names: list[str]
    cov_spec: ModelSpec
    cols: list[int]
    leaves: list[str]
    leaf_levels: list[list[str]]
    keys: np.ndarray  # sorted mixed-radix keys of the training levels
    levels: list[str]


@dataclass
class _Spec:
    response: str | None
    response_vars: set[str]
    fixed_spec: ModelSpec
    fixed_names: list[str]
    offset_specs: list[ModelSpec]
    terms: list[_TermSpec]


@dataclass
class ParsedFormula:
    """Design matrices of a mixed-model formula evaluated on a data frame."""

    response: str | None
    y: np.ndarray | None
    X: np.ndarray
    fixed_names: list[str]
    offset: np.ndarray | None
    terms: list[RandomTerm]
    _spec: _Spec | None = field(default=None, repr=False, compare=False)

    def transform(self, data: pd.DataFrame) -> ParsedFormula:
        """Encode new data exactly as the training data were encoded.

        Parameters
        ----------
        data : pandas.DataFrame
            New observations.  The response column is optional.

        Returns
        -------
        ParsedFormula
            Same columns, names and level coding as ``self``; random-term
            codes are -1 for grouping levels (or missing values) not seen in
            training; ``y`` is None when the response is absent.
        """
        if self._spec is None:
            raise ValueError("this ParsedFormula was not created by parse_formula")
        return _evaluate(self._spec, _prepare(data))


# --------------------------------------------------------------------- parsing
def _toplevel(s: str) -> list[int]:
    """Parenthesis depth of each character (-1 inside quotes); checks balance."""
    depth, quote, out = 0, "", []
    for ch in s:
        if quote:
            out.append(-1)
            quote = "" if ch == quote else quote
            continue
        if ch in "'\"`":
            quote = ch
            out.append(-1)
            continue
        if ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced parentheses in formula {s!r}")
        out.append(depth)
        if ch == "(":
            depth += 1
    if depth or quote:
        raise ValueError(f"unbalanced parentheses or quotes in formula {s!r}")
    return out


def _split_terms(rhs: str) -> list[tuple[str, str]]:
    """Split at depth-0 ``+``/``-`` into ``(sign, text)`` pieces."""
    depth = _toplevel(rhs)
    pieces, sign, start = [], "+", 0
    for i, ch in enumerate(rhs + "+"):
        if ch in "+-" and (i == len(rhs) or depth[i] == 0):
            text = rhs[start:i].strip()
            if text:
                pieces.append((sign, text))
            elif i > 0 and rhs[:i].strip():
                raise ValueError(f"empty term in formula right-hand side {rhs!r}")
            sign, start = ch, i + 1
    return pieces


def _unwrap(text: str, name: str = "") -> str | None:
    """Inner text if ``text`` is exactly ``name( ... )``, else None."""
    if not (text.startswith(name + "(") and text.endswith(")")):
        return None
    depth = _toplevel(text)
    return text[len(name) + 1:-1] if depth.count(0) == len(name) + 2 else None


def _rewrite_pow(expr: str) -> str:
    """R's ``^`` inside a call (``I(x^2)``, ``log(x^2)``) is Python's ``**``."""
    depth = _toplevel(expr)
    return "".join("**" if ch == "^" and d > 0 else ch for ch, d in zip(expr, depth))


def _split(formula: str) -> tuple[str | None, str, list[tuple[str, str, bool]], list[str]]:
    depth = _toplevel(formula)
    tildes = [i for i, ch in enumerate(formula) if ch == "~" and depth[i] == 0]
    if len(tildes) > 1:
        raise ValueError(f"formula {formula!r} has more than one '~'")
    response = (formula[:tildes[0]].strip() or None) if tildes else None
    rhs = formula[tildes[0] + 1:] if tildes else formula
    pieces = _split_terms(rhs)
    if not pieces:
        raise ValueError(f"formula {formula!r} has an empty right-hand side")
    fixed: list[str] = []
    bars: list[tuple[str, str, bool]] = []
    offsets: list[str] = []
    for sign, text in pieces:
        inner = _unwrap(text)
        off = _unwrap(text, "offset")
        inner_depth = _toplevel(inner or "")
        bar = [i for i, ch in enumerate(inner or "") if ch == "|" and inner_depth[i] == 0]
        if bar or off is not None:
            if sign == "-":
                raise ValueError(f"cannot remove term {text!r} with '-'")
            if off is not None:
                offsets.append(_rewrite_pow(off.strip()))
                continue
            assert inner is not None
            double = len(bar) == 2 and bar[1] == bar[0] + 1
            if len(bar) > (2 if double else 1):
                raise ValueError(f"random-effects term {text!r} has more than one bar")
            expr, group = inner[:bar[0]].strip(), inner[bar[-1] + 1:].strip()
            if not group:
                raise ValueError(f"empty grouping factor in random-effects term {text!r}")
            if not expr:
                raise ValueError(f"empty left-hand side in random-effects term {text!r}")
            bars.append((_rewrite_pow(expr), group, not double))
        else:
            fixed.append(f"{sign} {text}")
    fixed_rhs = " ".join(fixed).removeprefix("+ ") if fixed else "1"
    return response, _rewrite_pow(fixed_rhs), bars, offsets


def split_formula(formula: str) -> tuple[str | None, str, list[tuple[str, str, bool]]]:
    """Split an lme4 formula into response, fixed part and random bars.

    Parameters
    ----------
    formula : str
        e.g. ``"y ~ x + offset(log(n)) + (1 + x || g)"``.

    Returns
    -------
    response : str or None
        Left-hand side of ``~`` (None for a one-sided formula / no ``~``).
    fixed : str
        Fixed-effects right-hand side for formulaic, ``offset()`` terms and
        bars removed (``"1"`` when nothing is left).
    bars : list of (str, str, bool)
        ``(expr, group, correlated)`` for each bar, in formula order;
        ``correlated`` is False for ``||``.

    Raises
    ------
    ValueError
        On unbalanced parentheses, an empty grouping factor, several ``~``.
    """
    response, fixed, bars, _ = _split(formula)
    return response, fixed, bars


# ------------------------------------------------------------ grouping factors
def _parse_group(text: str) -> Any:
    """Parse ``a``, ``a:b``, ``a/b/c`` into a tuple tree (``:`` binds tighter)."""
    tokens = re.findall(r"`[^`]+`|[A-Za-z_.][\w.]*|\S", text) + [""]
    pos = 0

    def atom() -> Any:
        nonlocal pos
        tok, pos = tokens[pos], pos + 1
        if tok == "(":
            node = binary("/", lambda: binary(":", atom))
            if tokens[pos] != ")":
                raise ValueError(f"unbalanced parentheses in grouping factor {text!r}")
            pos += 1
            return node
        if not re.fullmatch(r"`[^`]+`|[A-Za-z_.][\w.]*", tok):
            raise ValueError(f"cannot parse grouping factor {text!r}")
        return ("name", tok.strip("`"))

    def binary(op: str, sub: Any) -> Any:
        nonlocal pos
        node = sub()
        while tokens[pos] == op:
            pos += 1
            node = (op, node, sub())
        return node

    tree = binary("/", lambda: binary(":", atom))
    if tokens[pos]:
        raise ValueError(f"cannot parse grouping factor {text!r}")
    return tree


def _expand(node: Any) -> list[Any]:
    """lme4's expandSlash: ``a/b`` -> ``a``, ``b:a``."""
    if node[0] == "name":
        return [node]
    if node[0] == ":":
        if any(len(_expand(n)) > 1 for n in node[1:]):
            raise ValueError("nesting '/' inside an interaction ':' is not supported")
        return [node]
    left = _expand(node[1])
    if len(_expand(node[2])) > 1:
        raise ValueError("nesting '/' on the right of '/' is not supported")
    return left + [(":", node[2], left[-1])]


def _deparse(node: Any) -> str:
    if node[0] == "name":
        return node[1]
    right = _deparse(node[2])
    return f"{_deparse(node[1])}:" + (f"({right})" if node[2][0] == ":" else right)


def _leaves(node: Any) -> list[str]:
    return [node[1]] if node[0] == "name" else _leaves(node[1]) + _leaves(node[2])


def _label(v: Any) -> str:
    """R's character representation of a factor level."""
    if isinstance(v, (bool, np.bool_)):
        return "TRUE" if v else "FALSE"
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if float(v).is_integer() else format(float(v), ".15g")
    return str(v)


def _labels(s: pd.Series) -> np.ndarray:
    """Level label of each row (None where missing)."""
    categorical = isinstance(s.dtype, pd.CategoricalDtype)
    codes, uniques = pd.factorize(s.astype(object) if categorical else s)
    labels = np.array([_label(v) for v in uniques] + [None], dtype=object)
    return labels[codes]


def _level_positions(s: pd.Series, levels: list[str]) -> np.ndarray:
    """Position of each row's label in ``levels`` (-1: missing or unknown), as
    ``Index(levels).get_indexer(_labels(s))``, hashing the distinct values only."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes, uniques = s.cat.codes.to_numpy(), s.cat.categories
    else:
        codes, uniques = pd.factorize(s)
    pos = pd.Index(levels, dtype=object).get_indexer([_label(v) for v in uniques])
    return np.where(codes >= 0, pos[np.maximum(codes, 0)] if pos.size else -1, -1)


def _leaf_levels(s: pd.Series) -> list[str]:
    """Observed levels of a column, ordered as R's ``factor()`` orders them."""
    obs = s.dropna()
    if isinstance(s.dtype, pd.CategoricalDtype):
        present = set(pd.unique(obs.astype(object).to_numpy()))
        return [_label(c) for c in s.cat.categories if c in present]
    if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        return [_label(v) for v in np.unique(obs.to_numpy())]
    return sorted({_label(v) for v in pd.unique(obs.to_numpy())})


def _group_keys(data: pd.DataFrame, leaves: list[str], levels: list[list[str]]) -> np.ndarray:
    """Mixed-radix key per row (first leaf slowest); -1 if any leaf unknown."""
    key = np.zeros(len(data), dtype=np.int64)
    bad = np.zeros(len(data), dtype=bool)
    for leaf, lev in zip(leaves, levels):
        idx = _level_positions(data[leaf], lev)
        bad |= idx < 0
        key = key * len(lev) + idx
    key[bad] = -1
    return key


# ------------------------------------------------------------------ evaluation
def _prepare(data: pd.DataFrame) -> pd.DataFrame:
    """Turn logical columns into R-like ``FALSE``/``TRUE`` factors."""
    bools = [c for c in data.columns if pd.api.types.is_bool_dtype(data[c])]
    if not bools:
        return data
    data = data.copy()
    for c in bools:
        data[c] = pd.Categorical(data[c].map(_label), categories=["FALSE", "TRUE"])
    return data


def _check_columns(variables: set[str], data: pd.DataFrame, what: str) -> None:
    for v in sorted(variables):
        if v not in data.columns and v not in _CONTEXT and v not in TRANSFORMS:
            raise ValueError(f"unknown column {v!r} in {what}")
        if v in data.columns and data[v].isna().any():
            raise ValueError(f"column {v!r} (used in {what}) contains missing values")


_DISTINCT_MEMO: list = []  # (weakref to data, columns, result) of the last calls: a parse asks twice


def _distinct_rows(data: pd.DataFrame, variables: set[str]):
    """``(first, inverse)``: the positions of the distinct rows of ``data[variables]``
    and each row's distinct row, or None when there are too many to be worth it."""
    cols = sorted(v for v in variables if v in data.columns)
    if not cols or len(data) < 2000:
        return None
    for ref, names, result in _DISTINCT_MEMO:
        if ref() is data and names == cols:
            return result
    result = _find_distinct_rows(data, cols)
    _DISTINCT_MEMO.insert(0, (weakref.ref(data), cols, result))  # the data are not kept alive
    del _DISTINCT_MEMO[8:]
    return result


def _find_distinct_rows(data: pd.DataFrame, cols: list[str]):
    n = len(data)
    key = np.zeros(n, dtype=np.int64)
    span = 1
    for c in cols:
        s = data[c]
        codes = s.cat.codes.to_numpy() if isinstance(s.dtype, pd.CategoricalDtype) else pd.factorize(s.to_numpy())[0]
        k = int(codes.max()) + 2 if codes.size else 1
        span *= k
        if span > 2**62 or k > n // 4:
            return None
        key = key * k + (codes + 1)
    inverse, uniques = pd.factorize(key)
    if uniques.size > n // 4:
        return None
    first = np.empty(uniques.size, dtype=np.int64)
    first[inverse[::-1]] = np.arange(n - 1, -1, -1)
    return first, inverse


def _materialize(spec: str | ModelSpec, data: pd.DataFrame, what: str) -> Any:
    """Evaluate a formulaic formula or spec with R-like checks.

    Model matrices are built on the distinct rows of the variables they use (a handful
    for categorical designs: 160 rows instead of 68,627 for the ZEB2 model) and then
    expanded, unless a stateful transform (``center``, ``scale``, ``poly``...) asks for
    every row.
    """
    formula = Formula(spec) if isinstance(spec, str) else spec
    variables = set(formula.required_variables)
    _check_columns(variables, data, what)
    reduced = _distinct_rows(data, variables)

    def build(frame):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DataMismatchWarning)
                if isinstance(spec, str):
                    return model_matrix(spec, frame, context=_CONTEXT, na_action="ignore")
                return spec.get_model_matrix(frame, context=_CONTEXT, na_action="ignore")
        except (FormulaicError, DataMismatchWarning) as exc:
            raise ValueError(f"cannot evaluate {what}: {exc}") from exc

    mm = None
    if reduced is not None:
        first, inverse = reduced
        mm = build(data.iloc[first])
        if mm.model_spec.transform_state:  # the transform's state needs every row
            mm = None
        else:
            values = np.asarray(mm, dtype=np.float64).reshape(first.size, -1)[inverse]
    if mm is None:
        mm = build(data)
        values = np.asarray(mm, dtype=np.float64).reshape(len(data), -1)
    if np.isnan(values).any():
        raise ValueError(f"{what} evaluates to NaN for some rows")
    return mm, values


def _r_names(spec: ModelSpec) -> list[str]:
    """Column names of a model spec in lme4 style."""
    names: list[str] = []
    for st in spec.structure:
        cols: list[str] = []
        for scoped in st.scoped_terms:
            parts: list[list[str]] = []
            for sf in scoped.factors:
                expr = sf.factor.expr
                _, state = spec.encoder_state.get(expr, (None, {}))
                if "contrasts" in state:
                    cs = state["contrasts"]
                    fields = cs.contrasts.get_coding_column_names(cs.levels, sf.reduced)
                    parts.append([expr + _label(f) for f in fields])
                else:
                    parts.append([expr.replace(" ** ", "^")])
            if not parts:
                cols.append("(Intercept)")
            for prod in itertools.product(*reversed(parts)):
                if prod:
                    cols.append(":".join(prod[::-1]))
        names += cols if len(cols) == len(st.columns) else [str(c) for c in st.columns]
    return names


def _response(resp: str, data: pd.DataFrame) -> np.ndarray:
    if resp in data.columns:
        _check_columns({resp}, data, "the response")
        col = data[resp]
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            raise ValueError(f"response {resp!r} must be numeric or logical")
        return col.to_numpy(dtype=np.float64)
    return _materialize(f"0 + {resp}", data, "the response")[1][:, 0]


def _evaluate(spec: _Spec, data: pd.DataFrame) -> ParsedFormula:
    """Build all designs of ``spec`` on ``data`` (already through ``_prepare``)."""
    y = None
    if spec.response is not None and spec.response_vars <= set(data.columns):
        y = _response(spec.response, data)
    X = _materialize(spec.fixed_spec, data, "the fixed effects")[1]
    offset = None
    for off_spec in spec.offset_specs:
        values = _materialize(off_spec, data, "offset")[1]
        if values.shape[1] != 1:
            raise ValueError("an offset must evaluate to a single numeric column")
        offset = values[:, 0] if offset is None else offset + values[:, 0]
    terms = []
    for ts in spec.terms:
        Z = _materialize(ts.cov_spec, data, f"random term for {ts.group!r}")[1][:, ts.cols]
        _check_columns(set(ts.leaves) - set(data.columns), data, f"grouping factor {ts.group!r}")
        key = _group_keys(data, ts.leaves, ts.leaf_levels)
        pos = np.clip(np.searchsorted(ts.keys, key), 0, len(ts.keys) - 1)
        codes = np.where((key >= 0) & (ts.keys[pos] == key), pos, -1).astype(np.int64)
        terms.append(RandomTerm(ts.group, codes, list(ts.levels), np.ascontiguousarray(Z),
                                list(ts.names)))
    return ParsedFormula(spec.response, y, X, list(spec.fixed_names), offset, terms, spec)


def _term_specs(expr: str, group: str, correlated: bool, data: pd.DataFrame) -> list[_TermSpec]:
    """Expand one bar into lme4's terms (``||`` split first, then ``/``)."""
    cov_spec = _materialize(expr, data, f"random term ({expr} | {group})")[0].model_spec
    if any("contrasts" in st for _, st in cov_spec.encoder_state.values()):
        raise NotImplementedError("categorical covariates inside random-effects bars are not "
                                  f"supported: ({expr} | {group})")
    names = _r_names(cov_spec)
    blocks = [list(range(len(names)))] if correlated else [[j] for j in range(len(names))]
    out = []
    for block in blocks:
        for node in _expand(_parse_group(group)):
            leaves = _leaves(node)
            _check_columns(set(leaves), data, f"grouping factor {group!r}")
            leaf_levels = [_leaf_levels(data[leaf]) for leaf in leaves]
            keys = np.unique(_group_keys(data, leaves, leaf_levels))
            idx = np.unravel_index(keys, [len(lev) for lev in leaf_levels])
            levels = [":".join(lev[i] for lev, i in zip(leaf_levels, row)) for row in zip(*idx)]
            out.append(_TermSpec(_deparse(node), [names[j] for j in block], cov_spec, block,
                                 leaves, leaf_levels, keys, levels))
    return out


def parse_formula(formula: str, data: pd.DataFrame) -> ParsedFormula:
    """Build the fixed and random designs of an lme4 formula.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"y ~ 0 + a + offset(log(n)) + (1 | g/h)"``; a
        one-sided ``"~ ..."`` formula gives ``response=None``.
    data : pandas.DataFrame
        Training data; no used column may contain missing values.

    Returns
    -------
    ParsedFormula
        Terms are expanded as lme4 does (``||`` -> one term per column,
        ``a/b`` -> ``a`` and ``b:a``) and ordered as lme4's ``mkReTrms``
        orders them: if any term has more levels than the one before it, the
        order is reversed after sorting by increasing number of levels.

    Raises
    ------
    ValueError
        No ``~``, unknown columns, missing values, malformed bars.
    NotImplementedError
        Categorical covariates inside a random-effects bar.
    """
    if "~" not in formula:
        raise ValueError(f"formula {formula!r} has no '~'")
    response, fixed, bars, offsets = _split(formula)
    data = _prepare(data)
    response_vars: set[str] = set()
    if response is not None:
        _response(response, data)
        in_data = response in data.columns
        response_vars = {response} if in_data else set(Formula(response).required_variables)
    fixed_spec = _materialize(fixed, data, "the fixed effects")[0].model_spec
    off_specs = [_materialize(f"0 + {o}", data, "offset")[0].model_spec for o in offsets]
    terms = [ts for bar in bars for ts in _term_specs(*bar, data)]
    nl = [len(t.levels) for t in terms]
    if any(b > a for a, b in zip(nl, nl[1:])):
        terms = [terms[i] for i in np.argsort(nl, kind="stable")[::-1]]
    spec = _Spec(response, response_vars, fixed_spec, _r_names(fixed_spec), off_specs, terms)
    return _evaluate(spec, data)
