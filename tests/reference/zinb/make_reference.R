# Reference fits of Bioconductor zinbwave for skmixed's ZINBWaVE.
#
# Usage (from this folder, after `python make_data.py`):
#   Rscript make_reference.R                 # every fit
#   Rscript make_reference.R sim             # only fits whose name starts with "sim"
#   Rscript make_reference.R pbmc500_full    # one fit
# Options through the environment:
#   ZINB_BPPARAM=serial|multicore2   (default serial)
#
# Needs R with zinbwave (>= 1.25), softImpute, Matrix, BiocParallel. The tests read only
# the CSV files this script writes; they need no R.
#
# Every fit: zinbModel -> zinbInitialize -> zinbOptimize with zinbFit's defaults (this is
# exactly what zinbFit does; for the sim fits the script checks that zinbFit with the same
# seed returns identical parameters), verbose = TRUE so the penalised log-likelihood of
# every iteration can be recorded (the extra evaluations cost milliseconds).
#
# Files per fit <fit> (first column = row label, header = column labels; numbers with 17
# significant digits; shapes as zinbwave stores the slots, cells x genes data):
#   <fit>_W.csv (n x K), <fit>_alpha_mu.csv / _alpha_pi.csv (K x J),
#   <fit>_beta_mu.csv / _beta_pi.csv (M x J), <fit>_gamma_mu.csv / _gamma_pi.csv (L x n),
#   <fit>_zeta.csv (J), <fit>_epsilons.csv (slots and expanded per-row weights),
#   <fit>_X.csv (n x M design), <fit>_trace.csv (penalised log-likelihood after each step),
#   <fit>_init_*.csv (same, after zinbInitialize; sim fits only).
# Summary tables: fits.csv (one row per fit), evaluation.csv (held-out and imputation
# numbers, initial log-likelihoods).

suppressPackageStartupMessages({
    library(zinbwave)
    library(Matrix)
    library(BiocParallel)
})

here <- local({
    a <- commandArgs(trailingOnly = FALSE)
    f <- sub("^--file=", "", a[grep("^--file=", a)])
    if (length(f)) dirname(normalizePath(f)) else getwd()
})
setwd(here)

ZINBWAVE_COMMIT <- "0835b7df99bda31a5aa5ed058ad295422af2b52b"  # drisso/zinbwave HEAD built here
VERSION <- as.character(packageVersion("zinbwave"))
bp_choice <- Sys.getenv("ZINB_BPPARAM", "serial")
BP <- switch(bp_choice,
             serial = SerialParam(),
             multicore2 = MulticoreParam(workers = 2),
             stop("ZINB_BPPARAM must be serial or multicore2"))
TIMING_NOTE <- paste0("BPPARAM=", bp_choice, "; 2-core machine shared with other jobs, ",
                      "timings noisy; elapsed includes zinbInitialize + zinbOptimize")

# ------------------------------------------------------------------ small helpers
fmt <- function(x) sprintf("%.17g", as.vector(x))

write_mat <- function(M, file, rowlab, collab) {
    M <- as.matrix(M)
    stopifnot(length(rowlab) == nrow(M), length(collab) == ncol(M))
    S <- matrix(fmt(M), nrow = nrow(M))
    lines <- c(paste(c("row", collab), collapse = ","),
               if (nrow(M)) apply(cbind(rowlab, S), 1, paste, collapse = ","))
    writeLines(lines, file)
}

# read-modify-write of a summary CSV keyed by some columns, guarded by a lock directory
upsert <- function(file, row, key) {
    lock <- paste0(file, ".lock")
    for (k in 1:600) { if (dir.create(lock, showWarnings = FALSE)) break; Sys.sleep(0.5) }
    on.exit(unlink(lock, recursive = TRUE))
    row <- as.data.frame(row, stringsAsFactors = FALSE)
    if (file.exists(file)) {
        old <- read.csv(file, stringsAsFactors = FALSE, colClasses = "character")
        kk <- do.call(paste, c(old[key], sep = "\r"))
        old <- old[kk != do.call(paste, c(row[key], sep = "\r")), , drop = FALSE]
        row[] <- lapply(row, as.character)
        for (k in setdiff(names(row), names(old))) old[[k]] <- rep("", nrow(old))
        for (k in setdiff(names(old), names(row))) row[[k]] <- ""
        all <- rbind(old[names(row)], row)
    } else {
        row[] <- lapply(row, as.character)
        all <- row
    }
    all <- all[order(all[[key[1]]]), , drop = FALSE]
    write.csv(all, file, row.names = FALSE, quote = TRUE)
}

num <- function(x) fmt(x)

# .npy reader (little-endian int32/int64/float64, C order, 1-d), enough for scipy's npz
read_npy <- function(path) {
    con <- file(path, "rb"); on.exit(close(con))
    magic <- readBin(con, "raw", 6)
    ver <- readBin(con, "integer", 2, size = 1)
    hlen <- if (ver[1] == 1) readBin(con, "integer", 1, size = 2, signed = FALSE, endian = "little")
            else readBin(con, "integer", 1, size = 4, endian = "little")
    header <- rawToChar(readBin(con, "raw", hlen))
    descr <- sub(".*'descr': *'([^']+)'.*", "\\1", header)
    shape <- as.integer(strsplit(gsub("[^0-9,]", "", sub(".*'shape': *\\(([^)]*)\\).*", "\\1", header)), ",")[[1]])
    n <- if (length(shape)) prod(shape) else 1
    switch(descr,
           "<i4" = readBin(con, "integer", n, size = 4, endian = "little"),
           "<i8" = { v <- readBin(con, "integer", 2 * n, size = 4, endian = "little");
                     v[seq(1, 2 * n, 2)] },  # values < 2^31
           "<f8" = readBin(con, "double", n, size = 8, endian = "little"),
           stop("unsupported dtype ", descr))
}

read_pbmc <- function() {
    d <- file.path(tempdir(), "pbmc500"); dir.create(d, showWarnings = FALSE)
    unzip("pbmc500.npz", exdir = d)
    x <- read_npy(file.path(d, "data.npy"))
    j <- read_npy(file.path(d, "indices.npy"))
    p <- read_npy(file.path(d, "indptr.npy"))
    shape <- read_npy(file.path(d, "shape.npy"))
    # CSR (cells x genes) -> read as CSC of the transpose
    Yt <- sparseMatrix(i = j + 1L, p = p, x = as.numeric(x), dims = rev(shape))
    Y <- t(as.matrix(Yt))
    storage.mode(Y) <- "integer"
    genes <- read.csv("pbmc500_genes.csv", stringsAsFactors = FALSE)
    cells <- read.csv("pbmc500_cells.csv", stringsAsFactors = FALSE)
    dimnames(Y) <- list(cells$barcode, genes$gene_symbol)
    Y
}

read_sim <- function() {
    d <- read.csv(gzfile("sim_counts.csv.gz"), check.names = FALSE, stringsAsFactors = FALSE)
    Y <- as.matrix(d[, -1]); storage.mode(Y) <- "integer"
    rownames(Y) <- d$cell
    cells <- read.csv("sim_cells.csv", stringsAsFactors = FALSE)
    stopifnot(identical(cells$cell, rownames(Y)))
    list(Y = Y, cells = cells)
}

# ------------------------------------------------------------------ one fit
pen_loglik <- function(m, Y) loglik(m, Y) - penalty(m)

# column names of a design; zinbwave's default designs (a column of 1s) have none
labs <- function(D) {
    if (!is.null(colnames(D))) return(colnames(D))
    ifelse(apply(D, 2, function(v) all(v == 1)), "(Intercept)", paste0("V", seq_len(ncol(D))))
}

write_params <- function(m, prefix, cells, genes) {
    K <- nFactors(m)
    wl <- if (K) paste0("W", seq_len(K)) else character(0)
    write_mat(getW(m), paste0(prefix, "_W.csv"), cells, wl)
    write_mat(getAlpha_mu(m), paste0(prefix, "_alpha_mu.csv"), wl, genes)
    write_mat(getAlpha_pi(m), paste0(prefix, "_alpha_pi.csv"), wl, genes)
    write_mat(getBeta_mu(m), paste0(prefix, "_beta_mu.csv"), labs(getX_mu(m)), genes)
    write_mat(getBeta_pi(m), paste0(prefix, "_beta_pi.csv"), labs(getX_pi(m)), genes)
    write_mat(getGamma_mu(m), paste0(prefix, "_gamma_mu.csv"), labs(getV_mu(m)), cells)
    write_mat(getGamma_pi(m), paste0(prefix, "_gamma_pi.csv"), labs(getV_pi(m)), cells)
    write_mat(matrix(getZeta(m), ncol = 1), paste0(prefix, "_zeta.csv"), genes, "zeta")
}

write_epsilons <- function(m, file) {
    slots <- c("epsilon_beta_mu", "epsilon_gamma_mu", "epsilon_beta_pi", "epsilon_gamma_pi",
               "epsilon_W", "epsilon_alpha", "epsilon_zeta", "epsilon_min_logit")
    nm <- slots; val <- sapply(slots, function(s) slot(m, s))
    ex <- list(getEpsilon_beta_mu = getEpsilon_beta_mu(m),
               getEpsilon_gamma_mu = getEpsilon_gamma_mu(m),
               getEpsilon_beta_pi = getEpsilon_beta_pi(m),
               getEpsilon_gamma_pi = getEpsilon_gamma_pi(m),
               getEpsilon_W = getEpsilon_W(m), getEpsilon_alpha = getEpsilon_alpha(m),
               getEpsilon_zeta = getEpsilon_zeta(m))
    for (k in names(ex)) {
        v <- ex[[k]]
        if (length(v)) { nm <- c(nm, paste0(k, "[", seq_along(v), "]")); val <- c(val, v) }
    }
    writeLines(c("name,value", paste(nm, fmt(val), sep = ",")), file)
}

# parse zinbOptimize's verbose messages into a trace of the penalised log-likelihood
parse_trace <- function(msgs) {
    it <- 0L; out <- list()
    for (s in msgs) {
        s <- trimws(s)
        if (grepl("^Iteration ", s)) { it <- as.integer(sub("^Iteration ", "", s)); next }
        if (grepl(" = ", s)) {
            step <- sub(" = .*$", "", s)
            step <- c("penalized log-likelihood" = "start",
                      "After dispersion optimization" = "dispersion",
                      "After right optimization" = "right",
                      "After orthogonalization" = "orthogonalize",
                      "After left optimization" = "left")[step]
            out[[length(out) + 1]] <- data.frame(iteration = it, step = unname(step),
                                                 value = as.numeric(sub("^.* = ", "", s)))
        }
    }
    do.call(rbind, out)
}

run_fit <- function(name, Y, X, K, seed, save_init = FALSE, note = "") {
    cat(sprintf("[%s] %s: n=%d J=%d K=%d ...\n", format(Sys.time(), "%H:%M:%S"),
                name, nrow(Y), ncol(Y), K))
    n <- nrow(Y); J <- ncol(Y)
    cells <- rownames(Y); genes <- colnames(Y)
    msgs <- character(0)
    set.seed(seed)
    cpu <- function() { p <- proc.time(); sum(p[c("user.self", "sys.self")], na.rm = TRUE) }
    c0 <- cpu()
    t0 <- proc.time()[["elapsed"]]
    m0 <- if (is.null(X)) zinbModel(n = n, J = J, K = K) else zinbModel(n = n, J = J, X = X, K = K)
    init <- zinbInitialize(m0, Y, nb.repeat = 2, BPPARAM = BP)
    t1 <- proc.time()[["elapsed"]]
    invisible(capture.output(
        fit <- withCallingHandlers(
            zinbOptimize(init, Y, commondispersion = TRUE, maxiter = 25,
                         stop.epsilon = 1e-4, verbose = TRUE, BPPARAM = BP),
            message = function(e) {
                msgs <<- c(msgs, conditionMessage(e))
                if (grepl("^(Iteration|penalized)", conditionMessage(e)))
                    cat(format(Sys.time(), "%H:%M:%S"), name, conditionMessage(e), file = stderr())
                invokeRestart("muffleMessage")
            })))
    t2 <- proc.time()[["elapsed"]]
    c2 <- cpu()

    tr <- parse_trace(msgs)
    write.csv(transform(tr, value = fmt(value)), paste0(name, "_trace.csv"),
              row.names = FALSE, quote = FALSE)
    n_iter <- max(tr$iteration)
    converged <- !any(tr$iteration == n_iter & tr$step != "start")
    starts <- tr$value[tr$step == "start"]
    monotone_starts <- all(diff(starts) >= -1e-8 * abs(starts[-1]))
    monotone_steps <- all(diff(tr$value) >= -1e-8 * abs(tr$value[-1]))

    ll <- loglik(fit, Y); pen <- penalty(fit)
    ll0 <- loglik(init, Y); pen0 <- penalty(init)
    if (converged) stopifnot(abs((ll - pen) - starts[n_iter]) <= 1e-6 * abs(ll - pen))

    write_params(fit, name, cells, genes)
    write_epsilons(fit, paste0(name, "_epsilons.csv"))
    Xd <- fit@X
    write_mat(Xd, paste0(name, "_X.csv"), cells, labs(Xd))
    if (save_init) write_params(init, paste0(name, "_init"), cells, genes)

    upsert("fits.csv", list(
        fit = name, K = K, n_cells = n, n_genes = J,
        X_design = if (is.null(X)) "intercept (default)" else paste(colnames(X), collapse = "+"),
        loglik = num(ll), penalty = num(pen), penalized_loglik = num(ll - pen),
        loglik_per_entry = num(ll / (n * J)),
        zeta = num(getZeta(fit)[1]),
        init_loglik = num(ll0), init_penalty = num(pen0), init_penalized_loglik = num(ll0 - pen0),
        iterations = n_iter, converged = converged,
        monotone_between_iterations = monotone_starts, monotone_every_step = monotone_steps,
        elapsed_s = sprintf("%.1f", t2 - t0), elapsed_init_s = sprintf("%.1f", t1 - t0),
        elapsed_optimize_s = sprintf("%.1f", t2 - t1), cpu_s = sprintf("%.1f", c2 - c0),
        seed = seed, zinbwave_version = VERSION, zinbwave_commit = ZINBWAVE_COMMIT,
        note = paste(c(TIMING_NOTE, if (nzchar(note)) note), collapse = "; ")),
        key = "fit")
    cat(sprintf("[%s] %s: penalised loglik %.6f (loglik %.6f, penalty %.6f), %d iterations%s, %.1f s\n",
                format(Sys.time(), "%H:%M:%S"), name, ll - pen, ll, pen, n_iter,
                if (converged) "" else " (maxiter reached)", t2 - t0))
    list(fit = fit, init = init)
}

eval_row <- function(fit, quantity, value, note = "")
    upsert("evaluation.csv", list(fit = fit, quantity = quantity, value = num(value), note = note),
           key = c("fit", "quantity"))

# ------------------------------------------------------------------ held-out cells
# Gene-level parameters (beta_mu, beta_pi, alpha_mu, alpha_pi, zeta) fixed at the training
# fit; per test cell, (gamma_mu, gamma_pi, W) maximise that cell's penalised ZINB
# log-likelihood with zinbwave's own left-factor solver (the internal optimleft_fun used
# in step 4 of zinbOptimize, BFGS), weights as in the training fit
# (e_gamma_mu, e_gamma_pi, eps_W = J / n_train). Start: gamma_mu = mean over the cell's
# non-zero genes of log(y) - beta_mu; W = ridge least squares of the remaining residual on
# t(alpha_mu) over those genes (penalty eps_W); gamma_pi = 0. BFGS is restarted until the
# cell's objective changes by < 1e-10 relative (at most 20 restarts).
fit_left <- function(fit, Y) {
    stopifnot(ncol(fit@X) == 1, all(fit@X == 1), ncol(fit@V) == 1, all(fit@V == 1))
    n <- nrow(Y); J <- ncol(Y); K <- nFactors(fit)
    beta_mu <- getBeta_mu(fit); beta_pi <- getBeta_pi(fit)
    alpha_mu <- getAlpha_mu(fit); alpha_pi <- getAlpha_pi(fit)
    V_mu <- getV_mu(fit); V_pi <- getV_pi(fit); zeta <- getZeta(fit)
    eps <- c(getEpsilon_gamma_mu(fit), getEpsilon_gamma_pi(fit), getEpsilon_W(fit))
    O <- rep(0, J)
    obj <- function(par, y) zinb.loglik.regression(par, t(y), A.mu = V_mu, B.mu = t(alpha_mu),
        C.mu = t(beta_mu), A.pi = V_pi, B.pi = t(alpha_pi), C.pi = t(beta_pi),
        C.theta = zeta, epsilon = eps)
    res <- matrix(NA_real_, n, 2 + K); restarts <- integer(n)
    for (i in seq_len(n)) {
        y <- Y[i, ]; P <- y > 0
        g0 <- mean(log(y[P]) - beta_mu[1, P])
        r <- log(y[P]) - beta_mu[1, P] - g0
        A <- t(alpha_mu)[P, , drop = FALSE]
        w0 <- solve(crossprod(A) + diag(getEpsilon_W(fit), K), crossprod(A, r))
        par <- c(g0, 0, w0); f <- obj(par, y)
        for (k in 1:20) {
            par <- zinbwave:::optimleft_fun(par[1], par[2], par[-(1:2)], y, V_mu, alpha_mu,
                                            1, beta_mu, O, V_pi, alpha_pi, 1, beta_pi, O,
                                            zeta, eps)
            f_new <- obj(par, y)
            done <- abs(f_new - f) <= 1e-10 * abs(f)
            f <- f_new
            if (done) break
        }
        res[i, ] <- par; restarts[i] <- k
    }
    W <- res[, -(1:2), drop = FALSE]
    logMu <- matrix(1, n, 1) %*% beta_mu + t(V_mu %*% t(res[, 1])) + W %*% alpha_mu
    logitPi <- matrix(1, n, 1) %*% beta_pi + t(V_pi %*% t(res[, 2])) + W %*% alpha_pi
    ll <- zinb.loglik(Y, exp(logMu), rep(exp(zeta), rep(n, J)), logitPi)
    list(gamma_mu = res[, 1], gamma_pi = res[, 2], W = W, loglik = ll, restarts = restarts)
}

# ------------------------------------------------------------------ the fits
FITS <- c("sim_K2", "sim_K2_batch", "pbmc500_full", "pbmc500_train", "pbmc500_masked", "extras")
sel <- commandArgs(trailingOnly = TRUE)
todo <- if (length(sel)) FITS[Reduce(`|`, lapply(sel, function(s) if (s %in% FITS) FITS == s else startsWith(FITS, s)))] else FITS
cat("zinbwave", VERSION, "| BPPARAM", bp_choice, "| fits:", paste(todo, collapse = ", "), "\n")

if (any(startsWith(todo, "sim"))) {
    s <- read_sim(); Y <- s$Y
    if ("sim_K2" %in% todo) {
        r <- run_fit("sim_K2", Y, NULL, K = 2, seed = 1, save_init = TRUE)
        # the decomposition above is exactly zinbFit: same seed, same numbers
        set.seed(1)
        z <- zinbFit(t(Y), K = 2, BPPARAM = BP)
        stopifnot(isTRUE(all.equal(getW(z), getW(r$fit), tolerance = 0)),
                  isTRUE(all.equal(getBeta_mu(z), getBeta_mu(r$fit), tolerance = 0)))
        # the objective in the ordinary-theta regime and with a non-zero zeta penalty:
        # sim_K2's parameters with zeta replaced by the true per-gene log(theta)
        g <- read.csv("sim_genes.csv")
        m2 <- r$fit; m2@zeta <- g$true_log_theta
        nt <- "sim_K2 parameters with zeta = true_log_theta of sim_genes.csv"
        eval_row("sim_K2", "loglik_at_true_zeta", loglik(m2, Y), nt)
        eval_row("sim_K2", "penalty_at_true_zeta", penalty(m2), nt)
        eval_row("sim_K2", "optimize_zeta_at_init", zinbOptimizeDispersion(ncol(Y), getMu(r$init),
                 getLogitPi(r$init), getEpsilon_zeta(r$init), Y, BPPARAM = BP)[1],
                 "first dispersion step of zinbOptimize: optimize() on (-100, 100) from sim_K2_init_*")
        eval_row("sim_K2", "best_common_zeta_at_init", optimize(zinb.loglik.dispersion, Y = Y,
                 mu = getMu(r$init), logitPi = getLogitPi(r$init), maximum = TRUE,
                 interval = c(-10, 10), tol = 1e-10)$maximum,
                 "the actual maximiser over common zeta at sim_K2_init_* (optimize on (-10, 10))")
    }
    if ("sim_K2_batch" %in% todo) {
        batch <- factor(s$cells$batch)
        X <- model.matrix(~batch)
        rownames(X) <- rownames(Y)
        invisible(run_fit("sim_K2_batch", Y, X, K = 2, seed = 1, save_init = TRUE,
                          note = "X = model.matrix(~batch), batch from sim_cells.csv"))
    }
}

if (any(startsWith(todo, "pbmc"))) {
    Y <- read_pbmc()
    mask <- read.csv("pbmc500_mask.csv")
    split <- read.csv("pbmc500_split.csv", stringsAsFactors = FALSE)
    stopifnot(nrow(split) == nrow(Y))

    if ("pbmc500_full" %in% todo)
        invisible(run_fit("pbmc500_full", Y, NULL, K = 10, seed = 1))

    if ("pbmc500_train" %in% todo) {
        tr <- split$split == "train"
        r <- run_fit("pbmc500_train", Y[tr, ], NULL, K = 10, seed = 1,
                     note = "training cells of pbmc500_split.csv")
        Yte <- Y[!tr, ]
        t0 <- proc.time()[["elapsed"]]
        h <- fit_left(r$fit, Yte)
        el <- proc.time()[["elapsed"]] - t0
        cells <- rownames(Yte)
        write_mat(h$W, "pbmc500_train_test_W.csv", cells, paste0("W", seq_len(ncol(h$W))))
        write_mat(rbind(h$gamma_mu), "pbmc500_train_test_gamma_mu.csv", "(Intercept)", cells)
        write_mat(rbind(h$gamma_pi), "pbmc500_train_test_gamma_pi.csv", "(Intercept)", cells)
        nte <- nrow(Yte) * ncol(Yte)
        note <- "test cells; gene parameters of pbmc500_train fixed; gamma_mu, gamma_pi, W per test cell by zinbwave:::optimleft_fun (see make_reference.R fit_left)"
        eval_row("pbmc500_train", "heldout_loglik_per_entry", h$loglik / nte, note)
        eval_row("pbmc500_train", "heldout_loglik", h$loglik, note)
        eval_row("pbmc500_train", "heldout_n_entries", nte, "540 test cells x 500 genes")
        eval_row("pbmc500_train", "heldout_fit_elapsed_s", el, TIMING_NOTE)
        eval_row("pbmc500_train", "heldout_max_bfgs_restarts", max(h$restarts), "")
        eval_row("pbmc500_train", "train_loglik_per_entry",
                 loglik(r$fit, Y[tr, ]) / (sum(tr) * ncol(Y)), "training cells, fitted parameters")
    }

    if ("pbmc500_masked" %in% todo) {
        Ym <- Y
        idx <- cbind(mask$row + 1L, mask$col + 1L)
        stopifnot(all(Ym[idx] == mask$value))
        Ym[idx] <- 0L
        r <- run_fit("pbmc500_masked", Ym, NULL, K = 10, seed = 1,
                     note = "entries of pbmc500_mask.csv set to 0")
        mu <- getMu(r$fit); pi <- getPi(r$fit)
        truth <- mask$value
        est <- list(mu_times_1_minus_pi = (mu * (1 - pi))[idx],
                    mu = mu[idx],
                    imputeZeros = imputeZeros(r$fit, Ym)[idx])
        notes <- c(mu_times_1_minus_pi = "E[Y] = getMu * (1 - getPi) at the masked entries",
                   mu = "getMu (mean of the NB component) at the masked entries",
                   imputeZeros = "zinbwave::imputeZeros: mu * pi / (pi + (1-pi) NB(0)) at zeros")
        for (k in names(est)) {
            eval_row("pbmc500_masked", paste0("median_abs_error_", k), median(abs(truth - est[[k]])), notes[[k]])
            eval_row("pbmc500_masked", paste0("mean_abs_error_", k), mean(abs(truth - est[[k]])), notes[[k]])
        }
        eval_row("pbmc500_masked", "n_masked", length(truth), "")
        eval_row("pbmc500_masked", "median_true_value", median(truth), "")
    }
}

# ------------------------------------------------------------------ extras
# From the stored parameters of every fit in fits.csv: the common zeta that really
# maximises the log-likelihood at the fitted mu and pi (zinbwave's own search stops on
# the Poisson plateau, see doc/zinbwave_r_notes.md) and the objective there.
read_param <- function(file) {
    d <- read.csv(file, check.names = FALSE, stringsAsFactors = FALSE)
    M <- as.matrix(d[, -1, drop = FALSE]); rownames(M) <- d[[1]]; M
}
load_model <- function(fit) {
    P <- function(k) read_param(paste0(fit, "_", k, ".csv"))
    e <- read.csv(paste0(fit, "_epsilons.csv"), stringsAsFactors = FALSE)
    ev <- setNames(e$value, e$name)
    zinbModel(X = P("X"), W = P("W"), beta_mu = P("beta_mu"), beta_pi = P("beta_pi"),
              gamma_mu = P("gamma_mu"), gamma_pi = P("gamma_pi"),
              alpha_mu = P("alpha_mu"), alpha_pi = P("alpha_pi"), zeta = P("zeta")[, 1],
              epsilon_beta_mu = ev[["epsilon_beta_mu"]], epsilon_gamma_mu = ev[["epsilon_gamma_mu"]],
              epsilon_beta_pi = ev[["epsilon_beta_pi"]], epsilon_gamma_pi = ev[["epsilon_gamma_pi"]],
              epsilon_W = ev[["epsilon_W"]], epsilon_alpha = ev[["epsilon_alpha"]],
              epsilon_zeta = ev[["epsilon_zeta"]], epsilon_min_logit = ev[["epsilon_min_logit"]])
}
data_for <- function(fit) {
    if (startsWith(fit, "sim")) return(read_sim()$Y)
    Y <- read_pbmc()
    if (fit == "pbmc500_full") return(Y)
    if (fit == "pbmc500_train")
        return(Y[read.csv("pbmc500_split.csv", stringsAsFactors = FALSE)$split == "train", ])
    if (fit == "pbmc500_masked") {
        mask <- read.csv("pbmc500_mask.csv"); Y[cbind(mask$row + 1L, mask$col + 1L)] <- 0L
        return(Y)
    }
    stop("unknown fit ", fit)
}
if ("extras" %in% todo) {
    fits <- read.csv("fits.csv", stringsAsFactors = FALSE)
    for (fit in fits$fit) {
        Y <- data_for(fit); m <- load_model(fit)
        row <- fits[fits$fit == fit, ]
        ll <- loglik(m, Y); pen <- penalty(m)
        # the stored CSVs reproduce R's values (17 significant digits)
        stopifnot(abs(ll - as.numeric(row$loglik)) <= 1e-10 * abs(ll),
                  abs(pen - as.numeric(row$penalty)) <= 1e-10 * abs(pen))
        o <- optimize(zinb.loglik.dispersion, Y = Y, mu = getMu(m), logitPi = getLogitPi(m),
                      maximum = TRUE, interval = c(-10, 10), tol = 1e-10)
        nt <- paste0(fit, " parameters, zeta replaced by the maximiser over a common zeta ",
                     "(optimize on (-10, 10), tol 1e-10); penalty unchanged (var(zeta) = 0)")
        eval_row(fit, "best_common_zeta_at_fit", o$maximum, nt)
        eval_row(fit, "loglik_at_best_common_zeta", o$objective, nt)
        eval_row(fit, "penalized_loglik_at_best_common_zeta", o$objective - pen, nt)
        cat(sprintf("%s: zeta %.4f, loglik %.4f (zinbwave's %.4f)\n", fit, o$maximum, o$objective, ll))
    }
}
cat("done\n")
