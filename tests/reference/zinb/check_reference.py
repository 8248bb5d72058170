"""Re-evaluate zinbwave's objective at the stored parameters, independently of R.

Run from this folder:  python check_reference.py
For every row of fits.csv this rebuilds log mu and logit pi from the <fit>_*.csv
parameter files, computes the ZINB log-likelihood and zinbwave's penalty with
numpy/scipy, and prints the relative differences from the values R reported (they
should be ~1e-12; the tests may ask for 1e-8). It also re-evaluates the held-out
log-likelihood of pbmc500_train's test cells and the imputation errors of pbmc500_masked.

Note the NB log-pmf: zinbwave's common dispersion typically ends at theta ~ e^45 (see
doc/zinbwave_r_notes.md), where gammaln(y + theta) - gammaln(theta) loses every digit in
double precision. R's dnbinom switches to a Poisson-limit formula when y < 1e-10 theta;
so does nb_logpmf below.
"""

from __future__ import annotations

import csv
import gzip
import os

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

HERE = os.path.dirname(os.path.abspath(__file__))


def read_table(name):
    """A <fit>_*.csv file: first column row labels, header column labels."""
    with open(os.path.join(HERE, name)) as fh:
        rows = list(csv.reader(fh))
    cols = rows[0][1:]
    labels = [r[0] for r in rows[1:]]
    vals = np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=float)
    return vals.reshape(len(labels), len(cols)), labels, cols


def nb_logpmf(y, mu, theta):
    """log NB(y; mean mu, size theta), stable for huge theta like R's dnbinom(mu=)."""
    y, mu, theta = np.broadcast_arrays(np.asarray(y, float), mu, theta)
    out = np.empty(y.shape)
    big = (y > 0) & (y < 1e-10 * theta)   # R treats y == 0 exactly: -theta log1p(mu/theta)
    # Poisson-limit branch (R: x * log(mu / (1 + mu/size)) - mu - lgamma(x+1) + log1p(x(x-1)/(2 size)))
    yb, mb, tb = y[big], mu[big], theta[big]
    out[big] = (yb * np.log(mb / (1 + mb / tb)) - mb - gammaln(yb + 1)
                + np.log1p(yb * (yb - 1) / (2 * tb)))
    ys, ms, ts = y[~big], mu[~big], theta[~big]
    out[~big] = (gammaln(ys + ts) - gammaln(ts) - gammaln(ys + 1)
                 - ts * np.log1p(ms / ts) + np.where(ys > 0, ys * (np.log(ms) - np.log(ts + ms)), 0.0))
    return out


def zinb_loglik(Y, log_mu, logit_pi, zeta):
    theta = np.exp(zeta)[None, :]
    lp = nb_logpmf(Y, np.exp(log_mu), theta)
    zero = Y == 0
    ll = np.where(zero, lp + np.logaddexp(0.0, logit_pi - lp), lp) - np.logaddexp(0.0, logit_pi)
    return ll.sum()


def load_fit(fit):
    P = {}
    for k in ("W", "alpha_mu", "alpha_pi", "beta_mu", "beta_pi", "gamma_mu", "gamma_pi",
              "zeta", "X"):
        P[k] = read_table(f"{fit}_{k}.csv")[0]
    P["zeta"] = P["zeta"][:, 0]
    with open(os.path.join(HERE, f"{fit}_epsilons.csv")) as fh:
        eps = {r[0]: float(r[1]) for r in list(csv.reader(fh))[1:]}
    P["eps"] = eps
    return P


def expanded(eps, name, m):
    return np.array([eps[f"{name}[{i + 1}]"] for i in range(m)])


def predictors(P):
    J = P["beta_mu"].shape[1]
    ones_V = np.ones((J, 1))  # the reference fits use zinbwave's default V = 1_J
    log_mu = P["X"] @ P["beta_mu"] + (ones_V @ P["gamma_mu"]).T + P["W"] @ P["alpha_mu"]
    logit_pi = P["X"] @ P["beta_pi"] + (ones_V @ P["gamma_pi"]).T + P["W"] @ P["alpha_pi"]
    return log_mu, logit_pi


def penalty(P):
    e = P["eps"]
    K = P["W"].shape[1]
    pen = 0.0
    pen += e["epsilon_alpha"] * (np.sum(P["alpha_mu"] ** 2) + np.sum(P["alpha_pi"] ** 2)) / 2 if K else 0.0
    for b in ("beta_mu", "beta_pi", "gamma_mu", "gamma_pi"):
        w = expanded(e, "getEpsilon_" + b, P[b].shape[0])
        pen += np.sum(w[:, None] * P[b] ** 2) / 2
    pen += e["epsilon_W"] * np.sum(P["W"] ** 2) / 2
    z = P["zeta"]
    pen += e["epsilon_zeta"] * np.var(z, ddof=1) / 2
    return pen


def load_sim():
    with gzip.open(os.path.join(HERE, "sim_counts.csv.gz"), "rt") as fh:
        rows = list(csv.reader(fh))
    return np.array([[int(v) for v in r[1:]] for r in rows[1:]])


def load_pbmc():
    return sp.load_npz(os.path.join(HERE, "pbmc500.npz")).toarray()


def read_csv_dicts(name):
    with open(os.path.join(HERE, name)) as fh:
        return list(csv.DictReader(fh))


def data_for(fit, cache={}):
    if fit.startswith("sim"):
        return load_sim()
    if "pbmc" not in cache:
        cache["pbmc"] = load_pbmc()
    Y = cache["pbmc"]
    if fit == "pbmc500_full":
        return Y
    if fit == "pbmc500_train":
        split = np.array([r["split"] == "train" for r in read_csv_dicts("pbmc500_split.csv")])
        return Y[split]
    if fit == "pbmc500_masked":
        m = read_csv_dicts("pbmc500_mask.csv")
        Ym = Y.copy()
        Ym[[int(r["row"]) for r in m], [int(r["col"]) for r in m]] = 0
        return Ym
    raise KeyError(fit)


def main():
    fits = read_csv_dicts("fits.csv")
    worst = 0.0
    for row in fits:
        fit = row["fit"]
        Y = data_for(fit)
        P = load_fit(fit)
        log_mu, logit_pi = predictors(P)
        ll = zinb_loglik(Y, log_mu, logit_pi, P["zeta"])
        pen = penalty(P)
        r_ll, r_pen = float(row["loglik"]), float(row["penalty"])
        r_pll = float(row["penalized_loglik"])
        d = [abs(ll - r_ll) / abs(r_ll), abs(pen - r_pen) / abs(r_pen),
             abs(ll - pen - r_pll) / abs(r_pll)]
        worst = max(worst, *d)
        print(f"{fit:16s} loglik {ll:.10f} (rel diff {d[0]:.1e})  penalty {pen:.10f} "
              f"(rel diff {d[1]:.1e})  penalised {ll - pen:.10f} (rel diff {d[2]:.1e})")

    ev = {(r["fit"], r["quantity"]): float(r["value"]) for r in read_csv_dicts("evaluation.csv")} \
        if os.path.exists(os.path.join(HERE, "evaluation.csv")) else {}
    if ("sim_K2", "loglik_at_true_zeta") in ev:
        P = load_fit("sim_K2")
        P["zeta"] = np.array([float(r["true_log_theta"]) for r in read_csv_dicts("sim_genes.csv")])
        log_mu, logit_pi = predictors(P)
        ll, pen = zinb_loglik(load_sim(), log_mu, logit_pi, P["zeta"]), penalty(P)
        r_ll, r_pen = ev[("sim_K2", "loglik_at_true_zeta")], ev[("sim_K2", "penalty_at_true_zeta")]
        d = [abs(ll - r_ll) / abs(r_ll), abs(pen - r_pen) / abs(r_pen)]
        worst = max(worst, *d)
        print(f"sim_K2 at true zeta: loglik rel diff {d[0]:.1e}, penalty rel diff {d[1]:.1e}")
    if ("pbmc500_train", "heldout_loglik") in ev:
        Y = load_pbmc()
        split = np.array([r["split"] == "test" for r in read_csv_dicts("pbmc500_split.csv")])
        Yte = Y[split]
        P = load_fit("pbmc500_train")
        W = read_table("pbmc500_train_test_W.csv")[0]
        gmu = read_table("pbmc500_train_test_gamma_mu.csv")[0][0]
        gpi = read_table("pbmc500_train_test_gamma_pi.csv")[0][0]
        log_mu = P["beta_mu"][0][None, :] + gmu[:, None] + W @ P["alpha_mu"]
        logit_pi = P["beta_pi"][0][None, :] + gpi[:, None] + W @ P["alpha_pi"]
        ll = zinb_loglik(Yte, log_mu, logit_pi, P["zeta"])
        r = ev[("pbmc500_train", "heldout_loglik")]
        worst = max(worst, abs(ll - r) / abs(r))
        print(f"heldout loglik {ll:.10f} (rel diff {abs(ll - r) / abs(r):.1e}), "
              f"per entry {ll / Yte.size:.8f}")
    if ("pbmc500_masked", "median_abs_error_mu_times_1_minus_pi") in ev:
        m = read_csv_dicts("pbmc500_mask.csv")
        rows = np.array([int(r["row"]) for r in m]); cols = np.array([int(r["col"]) for r in m])
        truth = np.array([float(r["value"]) for r in m])
        P = load_fit("pbmc500_masked")
        log_mu, logit_pi = predictors(P)
        mu = np.exp(log_mu[rows, cols]); pi = 1 / (1 + np.exp(-logit_pi[rows, cols]))
        med = np.median(np.abs(truth - mu * (1 - pi)))
        r = ev[("pbmc500_masked", "median_abs_error_mu_times_1_minus_pi")]
        worst = max(worst, abs(med - r) / abs(r))
        print(f"masked: median |y - mu(1-pi)| {med:.10f} (R {r:.10f})")
    print(f"worst relative difference {worst:.1e}")
    return worst


if __name__ == "__main__":
    assert main() < 1e-8
