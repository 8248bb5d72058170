"""Write the data sets that the zinbwave reference fits (make_reference.R) read.

Run from this folder:  python make_data.py [path/to/desc-2.1.1-py3-none-any.whl]

(a) sim_*: a simulated zero-inflated negative binomial data set with known truth,
    300 cells x 100 genes, 3 clusters separated by K = 2 latent factors, 2 batches with
    a per-gene batch effect on log mu, per-gene dispersion, moderate zero inflation.
(b) pbmc500*: the 500 most variable genes (variance of log1p counts) of 10x pbmc3k, as
    shipped raw in the ``desc`` wheel (``pip download --no-deps desc==2.1.1``), plus a
    fixed 10% mask of its non-zero entries and a fixed 80/20 split of its cells.

Needs numpy and scipy; h5py only for (b). All indices written here are 0-based.
Every output is deterministic (fixed seeds; gzip written with mtime 0).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import os
import sys
import zipfile

import numpy as np
import scipy.sparse as sp

HERE = os.path.dirname(os.path.abspath(__file__))

SIM_SEED = 20240611
PBMC_MASK_SEED = 20240612
PBMC_SPLIT_SEED = 20240613


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _fmt(x):
    return repr(float(x))


# --------------------------------------------------------------------------- (a)
def make_sim(n_cells=300, n_genes=100, seed=SIM_SEED):
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(3), n_cells // 3)
    batch = np.tile(np.arange(2), n_cells // 2)  # balanced within each cluster

    # K = 2 latent factors: cluster centres on a triangle, plus within-cluster noise
    centres = np.array([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])
    W = centres[cluster] + rng.normal(0.0, 0.15, size=(n_cells, 2))
    alpha_mu = rng.normal(0.0, 0.8, size=(2, n_genes))
    alpha_pi = rng.normal(0.0, 0.3, size=(2, n_genes))

    beta_mu = rng.normal(1.5, 0.8, size=n_genes)          # gene log-mean intercept
    batch_effect = rng.normal(0.0, 0.4, size=n_genes)     # per-gene shift in batch 1
    log_size = rng.normal(0.0, 0.3, size=n_cells)         # cell log size factor
    log_size -= log_size.mean()
    beta_pi = rng.normal(-1.5, 0.5, size=n_genes)         # pi ~ 0.18 on average
    log_theta = rng.normal(np.log(2.0), 0.5, size=n_genes)

    log_mu = (beta_mu[None, :] + log_size[:, None] + W @ alpha_mu
              + batch[:, None] * batch_effect[None, :])
    logit_pi = beta_pi[None, :] + W @ alpha_pi
    mu = np.exp(log_mu)
    pi = 1.0 / (1.0 + np.exp(-logit_pi))
    theta = np.exp(log_theta)[None, :]

    # NB(mu, theta) as Poisson-Gamma, then zero inflation
    lam = rng.gamma(shape=np.broadcast_to(theta, mu.shape), scale=mu / theta)
    nb = rng.poisson(lam)
    dropout = rng.random(mu.shape) < pi
    Y = np.where(dropout, 0, nb).astype(np.int64)

    assert (Y.sum(axis=0) > 0).all(), "a gene is all zero"
    assert (Y.sum(axis=1) > 0).all(), "a cell is all zero"

    genes = [f"g{j + 1:03d}" for j in range(n_genes)]
    cells = [f"c{i + 1:03d}" for i in range(n_cells)]

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell"] + genes)
    for i in range(n_cells):
        w.writerow([cells[i]] + [int(v) for v in Y[i]])
    with open(os.path.join(HERE, "sim_counts.csv.gz"), "wb") as raw:
        with gzip.GzipFile(filename="sim_counts.csv", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(buf.getvalue().encode())

    _write_csv(
        os.path.join(HERE, "sim_cells.csv"),
        ["cell", "cluster", "batch", "true_W1", "true_W2", "true_log_size"],
        [[cells[i], int(cluster[i]), int(batch[i]), _fmt(W[i, 0]), _fmt(W[i, 1]),
          _fmt(log_size[i])] for i in range(n_cells)],
    )
    _write_csv(
        os.path.join(HERE, "sim_genes.csv"),
        ["gene", "true_beta_mu", "true_batch_effect", "true_alpha_mu1", "true_alpha_mu2",
         "true_beta_pi", "true_alpha_pi1", "true_alpha_pi2", "true_log_theta"],
        [[genes[j], _fmt(beta_mu[j]), _fmt(batch_effect[j]), _fmt(alpha_mu[0, j]),
          _fmt(alpha_mu[1, j]), _fmt(beta_pi[j]), _fmt(alpha_pi[0, j]), _fmt(alpha_pi[1, j]),
          _fmt(log_theta[j])] for j in range(n_genes)],
    )
    print(f"sim: {n_cells} x {n_genes}, zero fraction {np.mean(Y == 0):.3f}, "
          f"dropout fraction {dropout.mean():.3f}, mean count {Y.mean():.2f}")


# --------------------------------------------------------------------------- (b)
def _load_pbmc3k(wheel):
    import h5py

    with zipfile.ZipFile(wheel) as z:
        raw = z.read("desc/datasets/pbmc.h5ad")
    with h5py.File(io.BytesIO(raw), "r") as f:
        g = f["X"]
        assert g.attrs["h5sparse_format"] in ("csr", b"csr")
        shape = tuple(int(s) for s in g.attrs["h5sparse_shape"])
        X = sp.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=shape)
        var = f["var"][:]
        obs = f["obs"][:]
    symbols = [s.decode() for s in var["gene_symbols"]]
    ids = [s.decode() for s in var["gene_ids"]]
    barcodes = [s.decode() for s in obs["barcode"]]
    data = X.data
    assert np.all(data == np.round(data)) and data.min() >= 0
    X = sp.csr_matrix((data.astype(np.int64), X.indices, X.indptr), shape=shape)
    X.sum_duplicates()
    X.sort_indices()
    return X, symbols, ids, barcodes


def make_pbmc(wheel, n_top=500, min_cells=10, mask_frac=0.10):
    X, symbols, ids, barcodes = _load_pbmc3k(wheel)
    n, p = X.shape
    assert (n, p) == (2700, 32738), X.shape

    detected = np.asarray((X > 0).sum(axis=0)).ravel()
    # variance over cells (ddof = 0, zeros included) of log1p(counts), per gene
    L = X.astype(np.float64)
    L.data = np.log1p(L.data)
    m1 = np.asarray(L.mean(axis=0)).ravel()
    m2 = np.asarray(L.multiply(L).mean(axis=0)).ravel()
    var = m2 - m1 ** 2
    cand = np.flatnonzero(detected >= min_cells)
    # highest variance first, ties broken by the smaller gene index
    order = cand[np.lexsort((cand, -var[cand]))]
    genes = np.sort(order[:n_top])          # keep the original gene order

    Y = X[:, genes].tocsr()
    keep = np.flatnonzero(np.asarray(Y.sum(axis=1)).ravel() > 0)
    Y = Y[keep].tocsr()
    Y.sort_indices()
    Y = Y.astype(np.int32)
    assert (np.asarray(Y.sum(axis=0)).ravel() > 0).all()
    n_cells = Y.shape[0]

    sp.save_npz(os.path.join(HERE, "pbmc500.npz"), Y, compressed=True)
    _write_csv(
        os.path.join(HERE, "pbmc500_genes.csv"),
        ["col", "gene_index_pbmc3k", "gene_symbol", "gene_id", "var_log1p", "n_cells_detected"],
        [[k, int(g), symbols[g], ids[g], _fmt(var[g]), int(detected[g])]
         for k, g in enumerate(genes)],
    )
    _write_csv(
        os.path.join(HERE, "pbmc500_cells.csv"),
        ["row", "cell_index_pbmc3k", "barcode"],
        [[k, int(c), barcodes[c]] for k, c in enumerate(keep)],
    )

    # 10% of the non-zero entries, never emptying a cell or a gene of non-zeros
    rng = np.random.default_rng(PBMC_MASK_SEED)
    C = Y.tocoo()
    rows, cols, vals = C.row, C.col, C.data
    nnz = vals.size
    n_mask = int(round(mask_frac * nnz))
    chosen = np.sort(rng.choice(nnz, size=n_mask, replace=False))
    masked = np.zeros(nnz, bool)
    masked[chosen] = True
    restored = 0
    for axis_idx, size in ((rows, n_cells), (cols, Y.shape[1])):
        left = np.bincount(axis_idx[~masked], minlength=size)
        for k in np.flatnonzero(left == 0):
            e = np.flatnonzero((axis_idx == k) & masked)[0]
            masked[e] = False
            restored += 1
    idx = np.flatnonzero(masked)
    _write_csv(
        os.path.join(HERE, "pbmc500_mask.csv"),
        ["row", "col", "value"],
        [[int(rows[e]), int(cols[e]), int(vals[e])] for e in idx],
    )

    # fixed 80/20 split of the cells
    rng = np.random.default_rng(PBMC_SPLIT_SEED)
    perm = rng.permutation(n_cells)
    n_train = int(round(0.8 * n_cells))
    is_train = np.zeros(n_cells, bool)
    is_train[perm[:n_train]] = True
    Yt = Y[is_train]
    assert (np.asarray(Yt.sum(axis=0)).ravel() > 0).all(), "a gene is all zero in train"
    assert (np.asarray(Y[~is_train].sum(axis=1)).ravel() > 0).all()
    _write_csv(
        os.path.join(HERE, "pbmc500_split.csv"),
        ["row", "split"],
        [[k, "train" if is_train[k] else "test"] for k in range(n_cells)],
    )

    size = os.path.getsize(os.path.join(HERE, "pbmc500.npz"))
    print(f"pbmc500: {n_cells} cells x {Y.shape[1]} genes, nnz {nnz}, "
          f"zero fraction {1 - nnz / (n_cells * Y.shape[1]):.3f}, npz {size / 1e6:.2f} MB; "
          f"mask {idx.size} entries ({restored} restored to keep rows/cols non-empty); "
          f"train {n_train}, test {n_cells - n_train}")


if __name__ == "__main__":
    make_sim()
    wheel = sys.argv[1] if len(sys.argv) > 1 else None
    if wheel is None:
        found = glob.glob("/tmp/desc/desc-2.1.1-*.whl")
        wheel = found[0] if found else None
    if wheel is None:
        print("pbmc500 skipped: pass the desc-2.1.1 wheel "
              "(pip download --no-deps desc==2.1.1 -d /tmp/desc)")
    else:
        make_pbmc(wheel)
