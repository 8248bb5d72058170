"""p-values of the resampling test: empirical, and from a skew-normal fitted to the
resampled statistics by the method of moments (checked by a Kolmogorov-Smirnov test)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats

# ------------------------------------------------------------------- skew-normal
_SN_MAX_SKEW = 0.99  # the skew-normal's skewness is below 0.9953


def skewnorm_moments(S):
    """Method-of-moments skew-normal fit to each row of ``S`` (rows finite).

    Returns
    -------
    shape, loc, scale : ndarrays (``scipy.stats.skewnorm`` parameters ``a, loc, scale``)
    """
    S = np.asarray(S, dtype=np.float64)
    m = S.mean(axis=1)
    d = S - m[:, None]
    s2 = np.mean(d**2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.mean(d**3, axis=1) / s2**1.5
    g = np.clip(np.nan_to_num(g), -_SN_MAX_SKEW, _SN_MAX_SKEW)
    ag = np.abs(g) ** (2.0 / 3.0)
    delta = np.sign(g) * np.sqrt(np.pi / 2 * ag / (ag + ((4 - np.pi) / 2) ** (2.0 / 3.0)))
    shape = delta / np.sqrt(1 - delta**2)
    scale = np.sqrt(s2 / (1 - 2 * delta**2 / np.pi))
    loc = m - scale * delta * np.sqrt(2 / np.pi)
    return shape, loc, scale


def _sided(left, right, alternative):
    if alternative == "less":
        return left
    if alternative == "greater":
        return right
    return np.minimum(1.0, 2.0 * np.minimum(left, right))


def resampling_pvalues(observed, resampled, alternative="two-sided", ks_level=0.01):
    """Empirical and skew-normal p-values of ``observed[k]`` against ``resampled[k]``.

    The skew-normal p-value is used (``pvalue``) where every resampled statistic is
    finite and a Kolmogorov-Smirnov test of the fit does not reject at ``ks_level``;
    elsewhere ``pvalue`` is the empirical one, ``(1 + #{resamples at least as
    extreme}) / (1 + #{defined resamples})``: NaN resampled statistics are left out,
    ``-inf`` ones (treated counts all zero) are the most extreme on the left, ties
    count as extreme, and a NaN observed statistic gets NaN p-values.

    Returns
    -------
    DataFrame with columns p_empirical, p_skewnorm, pvalue, skewnorm_ok, sn_shape,
    sn_loc, sn_scale
    """
    obs = np.asarray(observed, dtype=np.float64)
    S = np.asarray(resampled, dtype=np.float64)
    K, B = S.shape
    # NaN never counts as extreme: an undefined observed statistic has no p-value, and
    # undefined resampled ones (no treated cell in that resample) are left out
    n_valid = np.sum(~np.isnan(S), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        left = (1.0 + np.sum(S <= obs[:, None], axis=1)) / (n_valid + 1.0)
        right = (1.0 + np.sum(S >= obs[:, None], axis=1)) / (n_valid + 1.0)
    p_emp = np.where(np.isnan(obs) | (n_valid == 0), np.nan, _sided(left, right, alternative))
    finite = np.all(np.isfinite(S), axis=1) & np.isfinite(obs)
    shape = np.full(K, np.nan)
    loc = np.full(K, np.nan)
    scale = np.full(K, np.nan)
    p_sn = np.full(K, np.nan)
    ok = np.zeros(K, bool)
    if finite.any():
        a, lo, sc = skewnorm_moments(S[finite])
        good = sc > 0
        idx = np.flatnonzero(finite)[good]
        a, lo, sc = a[good], lo[good], sc[good]
        shape[idx], loc[idx], scale[idx] = a, lo, sc
        dist = scipy.stats.skewnorm(a[:, None], lo[:, None], sc[:, None])
        cdf = dist.cdf(np.sort(S[idx], axis=1))
        i = np.arange(1, B + 1)
        D = np.maximum(np.max(i / B - cdf, axis=1), np.max(cdf - (i - 1) / B, axis=1))
        ok[idx] = scipy.stats.kstwo.sf(D, B) > ks_level
        o = obs[idx][:, None]
        p_sn[idx] = _sided(dist.cdf(o)[:, 0], dist.sf(o)[:, 0], alternative)
    pvalue = np.where(ok, p_sn, p_emp)
    return pd.DataFrame(
        {"p_empirical": p_emp, "p_skewnorm": p_sn, "pvalue": pvalue, "skewnorm_ok": ok,
         "sn_shape": shape, "sn_loc": loc, "sn_scale": scale}
    )
