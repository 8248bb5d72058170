# Reference fits of GLM-EIV by the R package glmeiv (timothy-barry/glmeiv) on the data written by
# simulate_reference.py. Writes glmeiv_reference.csv (estimates, SEs, intervals, fold changes by
# run_delta_method, log-likelihood, iterations, NB size, timing) with the glmeiv commit and versions.
#
#   R CMD INSTALL -l /tmp/rlib /tmp/glmeiv      # glmeiv built from GitHub
#   GLMEIV_COMMIT=<sha> Rscript tests/reference/eiv/make_reference.R
#
# Two fits per pair: glmeiv's defaults (accelerated init, ep_tol = 1e-4 on the relative change of the
# log-likelihood; timed, pre-computations included) and the same fit run to ep_tol = 1e-12 so that the
# EM is at the MLE (the values the Python tests compare with).
.libPaths(c("/tmp/rlib", .libPaths()))
suppressPackageStartupMessages({library(glmeiv); library(MASS)})
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("--file=", "", args[grep("--file=", args)])))
dat <- read.csv(gzfile(file.path(here, "glmeiv_data.csv.gz")))
covariate_matrix <- data.frame(batch = dat$batch)
m_offset <- log(dat$lib_m)
g_offset <- log(dat$lib_g)
commit <- Sys.getenv("GLMEIV_COMMIT", "unknown")
rows <- list()
for (mcol in c("m_pois", "m_nb")) for (gcol in c("g_15", "g_4")) {
  m <- dat[[mcol]]; g <- dat[[gcol]]
  m_fam <- if (mcol == "m_pois") augment_family_object(poisson()) else augment_family_object(negative.binomial(NA))
  g_fam <- augment_family_object(poisson())
  # (1) glmeiv's own accelerated fit at its default tolerance, timed end to end
  time_default <- system.time({
    m_pre <- run_glmeiv_precomputation(m, covariate_matrix, m_offset, m_fam)
    g_pre <- run_glmeiv_precomputation(g, covariate_matrix, g_offset, g_fam)
    fit0 <- run_glmeiv_given_precomputations(m = m, g = g, m_precomp = m_pre, g_precomp = g_pre,
      covariate_matrix = covariate_matrix, m_offset = m_offset, g_offset = g_offset, n_em_rep = 15,
      pi_guess_range = c(1e-5, 0.03), m_perturbation_guess_range = log(c(0.1, 1.5)),
      g_perturbation_guess_range = log(c(0.5, 10)))
    s0 <- run_inference_on_em_fit(fit0, 0.95)
  })[["elapsed"]]
  # (2) the same, to the MLE
  fit <- run_glmeiv_given_precomputations(m = m, g = g, m_precomp = m_pre, g_precomp = g_pre,
    covariate_matrix = covariate_matrix, m_offset = m_offset, g_offset = g_offset, n_em_rep = 15,
    pi_guess_range = c(1e-5, 0.03), m_perturbation_guess_range = log(c(0.1, 1.5)),
    g_perturbation_guess_range = log(c(0.5, 10)), ep_tol = 1e-12)
  s <- run_inference_on_em_fit(fit, 0.95)
  theta <- if (mcol == "m_nb") m_pre$fam$theta else NA
  for (fitname in c("default", "mle")) {
    ss <- if (fitname == "default") s0 else s
    ff <- if (fitname == "default") fit0 else fit
    ss$z <- ss$estimate / ss$std_error
    fc <- run_delta_method(ss$estimate, ss$std_error)
    ss$fc_estimate <- fc$estimate; ss$fc_confint_lower <- fc$confint_lower; ss$fc_confint_upper <- fc$confint_upper
    ss$gene <- mcol; ss$perturbation <- gcol; ss$fit <- fitname
    ss$loglik <- ff$log_lik; ss$n_iter <- ff$n_iterations; ss$converged <- ff$converged
    ss$mrna_size <- theta; ss$time_s <- if (fitname == "default") time_default else NA
    ss$glmeiv_commit <- commit; ss$r_version <- R.version.string
    ss$glmeiv_version <- as.character(packageVersion("glmeiv")); ss$mass_version <- as.character(packageVersion("MASS"))
    rows[[length(rows) + 1]] <- ss
  }
}
out <- do.call(rbind, rows)
write.csv(out, file.path(here, "glmeiv_reference.csv"), row.names = FALSE)
print(out[out$fit == "mle", c("gene", "perturbation", "parameter", "estimate", "std_error", "loglik", "n_iter")])
