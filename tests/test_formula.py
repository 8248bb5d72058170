"""Tests of the lme4 formula parser (expected names checked against lme4 1.1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skmixed.formula import ParsedFormula, parse_formula, split_formula


@pytest.fixture
def df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "y": [1.0, 0.0, 3.0, 2.0, 5.0, 4.0, 0.0, 1.0],
            "x": [0.5, -1.0, 2.0, 1.5, -0.5, 0.0, 1.0, 3.0],
            "z": [1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0],
            "g": list("aabbccdd"),
            "h": list("uvwuvwuv"),
            "m": list("ppqqpqpq"),
            "k": [10, 2, 33, 2, 10, 33, 2, 10],
            "b": [True, False, True, True, False, False, True, False],
        }
    )


def test_zeb2_formula() -> None:
    groups = ["B : PBMC : diseased", "T : R : healthy", "B : PBMC : diseased", "NK : R : healthy"]
    data = pd.DataFrame(
        {
            "ZEB2": [3, 0, 5, 1],
            "cell_group": groups,
            "total_count": [100, 1000, 50, 10],
            "patient_assignment": ["U2", "C1", "C1", "U10"],
        }
    )
    p = parse_formula(
        "ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)", data
    )
    assert p.response == "ZEB2"
    np.testing.assert_array_equal(p.y, [3.0, 0.0, 5.0, 1.0])
    assert p.fixed_names == [
        "cell_groupB : PBMC : diseased",
        "cell_groupNK : R : healthy",
        "cell_groupT : R : healthy",
    ]
    np.testing.assert_array_equal(p.X, [[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(p.offset, np.log([100, 1000, 50, 10]))
    (term,) = p.terms
    assert term.group == "patient_assignment"
    assert term.levels == ["C1", "U10", "U2"]
    np.testing.assert_array_equal(term.codes, [2, 0, 0, 1])
    assert term.codes.dtype == np.int64
    assert term.names == ["(Intercept)"]
    np.testing.assert_array_equal(term.Z, np.ones((4, 1)))


def test_treatment_contrasts() -> None:
    data = pd.DataFrame(
        {
            "TICKS": [0, 2, 1, 4],
            "YEAR": ["96", "95", "97", "96"],
            "cHEIGHT": [1.5, -2.0, 0.0, 3.0],
            "f": pd.Categorical(["a", "c", "b", "c"], categories=["c", "a", "b"]),
            "BROOD": ["501", "502", "501", "503"],
        }
    )
    p = parse_formula("TICKS ~ YEAR + cHEIGHT + f + (1 | BROOD)", data)
    assert p.fixed_names == ["(Intercept)", "YEAR96", "YEAR97", "cHEIGHT", "fa", "fb"]
    np.testing.assert_array_equal(
        p.X,
        [[1, 1, 0, 1.5, 1, 0], [1, 0, 0, -2.0, 0, 0], [1, 0, 1, 0.0, 0, 1], [1, 1, 0, 3.0, 0, 0]],
    )


def test_interactions_and_functions(df: pd.DataFrame) -> None:
    p = parse_formula("y ~ x*h + (1 | g)", df)
    assert p.fixed_names == ["(Intercept)", "x", "hv", "hw", "x:hv", "x:hw"]
    np.testing.assert_array_equal(p.X[2], [1, 2.0, 0, 1, 0, 2.0])
    p = parse_formula("y ~ 0 + h:m + (1 | g)", df)  # first factor varies fastest, as in R
    assert p.fixed_names == ["hu:mp", "hv:mp", "hw:mp", "hu:mq", "hv:mq", "hw:mq"]
    np.testing.assert_array_equal(p.X[3], [0, 0, 0, 1, 0, 0])
    p = parse_formula("y ~ log(z) + scale(x) + I(x^2) + b + factor(k) + (1 | g)", df)
    assert p.fixed_names == [
        "(Intercept)", "log(z)", "scale(x)", "I(x^2)", "bTRUE", "factor(k)10", "factor(k)33",
    ]
    np.testing.assert_allclose(p.X[:, 1], np.log(df.z))
    np.testing.assert_allclose(p.X[:, 2], (df.x - df.x.mean()) / df.x.std(ddof=1))
    np.testing.assert_allclose(p.X[:, 3], df.x**2)
    np.testing.assert_array_equal(p.X[:, 4], df.b.astype(float))
    np.testing.assert_array_equal(p.X[:, 5], (df.k == 10).astype(float))


def test_random_intercept_forms(df: pd.DataFrame) -> None:
    for bar, names, first in [
        ("(x | g)", ["(Intercept)", "x"], [1.0, 0.5]),
        ("(1 + x | g)", ["(Intercept)", "x"], [1.0, 0.5]),
        ("(0 + x | g)", ["x"], [0.5]),
        ("(-1 + x | g)", ["x"], [0.5]),
        ("(1 | g)", ["(Intercept)"], [1.0]),
    ]:
        (term,) = parse_formula(f"y ~ 1 + {bar}", df).terms
        assert term.names == names
        np.testing.assert_array_equal(term.Z[0], first)
        assert term.Z.shape == (8, len(names))


def test_double_bar_expansion(df: pd.DataFrame) -> None:
    p = parse_formula("y ~ x + (1 + x || g)", df)
    assert [(t.group, t.names) for t in p.terms] == [("g", ["(Intercept)"]), ("g", ["x"])]
    np.testing.assert_array_equal(p.terms[0].Z[:, 0], np.ones(8))
    np.testing.assert_array_equal(p.terms[1].Z[:, 0], df.x)
    np.testing.assert_array_equal(p.terms[1].codes, [0, 0, 1, 1, 2, 2, 3, 3])
    terms = parse_formula("y ~ x + (x || g)", df).terms
    assert [t.names for t in terms] == [["(Intercept)"], ["x"]]
    assert [t.names for t in parse_formula("y ~ x + (0 + x || g)", df).terms] == [["x"]]


def test_lme4_term_order(df: pd.DataFrame) -> None:
    # lme4's mkReTrms: rev(order(nlevels)) when some term has more levels than its predecessor
    p = parse_formula("y ~ 1 + (1 | h) + (x || g)", df)
    assert [(t.group, t.names) for t in p.terms] == [
        ("g", ["x"]), ("g", ["(Intercept)"]), ("h", ["(Intercept)"]),
    ]
    p = parse_formula("y ~ 1 + (0 + x | g) + (1 | h)", df)  # already decreasing: unchanged
    assert [t.group for t in p.terms] == ["g", "h"]


def test_nested_groups() -> None:
    data = pd.DataFrame(
        {"y": [1, 2, 3, 4, 5], "LOCATION": [32, 32, 4, 4, 32], "BROOD": [501, 502, 501, 503, 501]}
    )
    p = parse_formula("y ~ 1 + (1 | LOCATION/BROOD)", data)
    assert [t.group for t in p.terms] == ["BROOD:LOCATION", "LOCATION"]
    inner, outer = p.terms
    assert inner.levels == ["501:4", "501:32", "502:32", "503:4"]  # numeric sort per factor
    np.testing.assert_array_equal(inner.codes, [1, 2, 0, 3, 1])
    assert outer.levels == ["4", "32"]
    np.testing.assert_array_equal(outer.codes, [1, 1, 0, 0, 1])


def test_three_level_nesting(df: pd.DataFrame) -> None:
    p = parse_formula("y ~ 1 + (1 | g/h/k)", df)
    assert [t.group for t in p.terms] == ["k:(h:g)", "h:g", "g"]
    assert p.terms[0].levels[:3] == ["2:u:b", "2:u:d", "2:v:a"]
    assert p.terms[0].levels[-1] == "33:w:c"
    assert p.terms[1].levels == ["u:a", "u:b", "u:d", "v:a", "v:c", "v:d", "w:b", "w:c"]


def test_crossed_and_interaction_groups(df: pd.DataFrame) -> None:
    p = parse_formula("y ~ 1 + (1 | g) + (1 | h)", df)
    assert [t.group for t in p.terms] == ["g", "h"]
    np.testing.assert_array_equal(p.terms[1].codes, [0, 1, 2, 0, 1, 2, 0, 1])
    (term,) = parse_formula("y ~ 1 + (1 | g:h)", df).terms
    assert term.group == "g:h"
    assert term.levels == ["a:u", "a:v", "b:u", "b:w", "c:v", "c:w", "d:u", "d:v"]
    (term,) = parse_formula("y ~ 1 + (1 | k)", df).terms
    assert term.levels == ["2", "10", "33"]
    (term,) = parse_formula("y ~ 1 + (1 | b)", df).terms
    assert term.levels == ["FALSE", "TRUE"]


def test_transform(df: pd.DataFrame) -> None:
    p = parse_formula("y ~ scale(x) + h + (1 + x | g) + (1 | g:h)", df)
    new = pd.DataFrame(
        {"x": [0.5, 10.0], "h": ["w", "u"], "g": ["zz", "b"], "k": [1, 2], "b": [True, False]}
    )
    q = p.transform(new)
    assert isinstance(q, ParsedFormula) and q.y is None
    assert q.fixed_names == p.fixed_names == ["(Intercept)", "scale(x)", "hv", "hw"]
    sx = (np.array([0.5, 10.0]) - df.x.mean()) / df.x.std(ddof=1)
    np.testing.assert_allclose(q.X, [[1, sx[0], 0, 1], [1, sx[1], 0, 0]])
    assert [t.group for t in q.terms] == ["g:h", "g"]  # lme4 order: more levels first
    np.testing.assert_array_equal(q.terms[0].codes, [-1, 2])  # "b:u" is seen, "zz:w" is not
    assert q.terms[0].levels == p.terms[0].levels
    np.testing.assert_array_equal(q.terms[1].codes, [-1, 1])
    np.testing.assert_array_equal(q.terms[1].Z, [[1, 0.5], [1, 10.0]])
    q = p.transform(df.assign(g=[None, "a", "b", "b", "c", "c", "d", "d"]))
    np.testing.assert_array_equal(q.terms[1].codes, [-1, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(q.y, df.y)
    np.testing.assert_allclose(q.X, p.X)
    with pytest.raises(ValueError, match="outside of the nominated levels"):
        p.transform(new.assign(h=["new", "u"]))


def test_offsets(df: pd.DataFrame) -> None:
    p = parse_formula("y ~ x + offset(log(z)) + offset(x) + (1 | g)", df)
    np.testing.assert_allclose(p.offset, np.log(df.z) + df.x)
    assert p.fixed_names == ["(Intercept)", "x"]
    data = df.rename(columns={"z": "offset"})
    p = parse_formula("y ~ offset(offset) + (1 | g)", data)
    np.testing.assert_array_equal(p.offset, data["offset"])
    assert p.fixed_names == ["(Intercept)"]
    np.testing.assert_allclose(p.transform(data.iloc[:2]).offset, [1.0, 2.0])
    assert parse_formula("y ~ x + (1 | g)", df).offset is None


def test_split_formula() -> None:
    resp, fixed, bars = split_formula(
        "y ~ 0 + a*b + offset(log(n)) + I(x^2) + (1 + x || g) + (x | a/b) - c"
    )
    assert resp == "y"
    assert fixed == "0 + a*b + I(x**2) - c"
    assert bars == [("1 + x", "g", False), ("x", "a/b", True)]
    assert split_formula("~ (1 | g)") == (None, "1", [("1", "g", True)])


@pytest.mark.parametrize(
    ("formula", "match"),
    [
        ("y x + (1 | g)", "no '~'"),
        ("y ~ x + nope + (1 | g)", "unknown column 'nope'"),
        ("y ~ x + (1 | nope)", "unknown column 'nope'"),
        ("nope ~ x + (1 | g)", "unknown column 'nope'"),
        ("y ~ x + offset(log(nope))", "unknown column 'nope'"),
        ("y ~ x + (1 | )", "empty grouping factor"),
        ("y ~ x + (1 | g", "unbalanced parentheses"),
        ("y ~ x + (1 | g))", "unbalanced parentheses"),
        ("y ~ x + (1 | g | h)", "more than one bar"),
        ("y ~ x ~ z", "more than one '~'"),
    ],
)
def test_errors(df: pd.DataFrame, formula: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_formula(formula, df)


@pytest.mark.parametrize(
    ("column", "formula"),
    [("x", "y ~ x + (1 | g)"), ("g", "y ~ 1 + (1 | g)"), ("y", "y ~ 1 + (1 | g)"),
     ("z", "y ~ offset(z) + (1 | g)")],
)
def test_missing_values_raise(df: pd.DataFrame, column: str, formula: str) -> None:
    data = df.astype({column: object})
    data.loc[3, column] = None
    with pytest.raises(ValueError, match=f"column '{column}'"):
        parse_formula(formula, data)


def test_categorical_covariate_in_bar(df: pd.DataFrame) -> None:
    with pytest.raises(NotImplementedError, match="categorical"):
        parse_formula("y ~ 1 + (h | g)", df)


def test_distinct_row_materialisation_equals_the_full_one(monkeypatch):
    """Designs are built on the distinct rows of their variables and expanded (issue 14:
    the ZEB2 formula's 68,627 rows have 160 distinct ones); stateful transforms such as
    ``center`` still see every row. Both give the full-data matrices exactly."""
    import skmixed.formula as F

    rng = np.random.default_rng(0)
    n = 6000
    d = pd.DataFrame({
        "a": pd.Categorical(rng.choice(["x", "y", "z"], n), categories=["z", "y", "x", "unused"]),
        "b": rng.choice(["p", "q"], n),
        "u": rng.integers(0, 3, n).astype(float),
        "g": rng.choice([f"g{k}" for k in range(12)], n),
        "t": rng.uniform(1, 5, n),
    })
    d["y"] = rng.poisson(2.0, n)
    f = "y ~ a * b + center(u) + offset(log(t)) + (1 + u | g)"
    fast = F.parse_formula(f, d)
    monkeypatch.setattr(F, "_distinct_rows", lambda data, variables: None)
    full = F.parse_formula(f, d)
    np.testing.assert_array_equal(fast.X, full.X)
    np.testing.assert_array_equal(fast.offset, full.offset)
    assert fast.fixed_names == full.fixed_names
    for a, b in zip(fast.terms, full.terms):
        np.testing.assert_array_equal(a.Z, b.Z)
        np.testing.assert_array_equal(a.codes, b.codes)
        assert a.levels == b.levels
