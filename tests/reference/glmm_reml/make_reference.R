## =============================================================================
## make_reference.R -- glmmTMB REML = TRUE reference values for PoissonGLMM(reml=True)
## =============================================================================
##
## Run from the repository root:
##
##     Rscript tests/reference/glmm_reml/make_reference.R
##
## glmmTMB's REML = TRUE puts the fixed effects among the random parameters
## (flat prior), so the Laplace approximation integrates them out with the random
## effects; the variance parameters maximise that restricted likelihood.
##
## Writes, into tests/reference/glmm_reml/, for each model id:
##   <id>_fixef.csv    term, estimate (fixef: the joint mode at the REML theta),
##                     se (sqrt(diag(vcov(fit))): sdreport's covariance of the
##                     fixed effects, which includes theta's uncertainty)
##   <id>_varcorr.csv  grp, var1, var2, vcov, sdcor (VarCorr)
##   <id>_summary.csv  loglik (REML), objective, nobs, theta (log SD etc.), versions
##
## Model ids:
##   grouse   TICKS ~ YEAR + cHEIGHT + (1 | BROOD), lme4's grouseticks
##   zeb2     ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment),
##            skmixed's bundled ZEB2-like data (68,627 cells)
##   slopes   y ~ x1 + x2 + offset(offset) + (1 + x1 | g), tests/reference/slopes_data.csv
## =============================================================================

suppressPackageStartupMessages(library(glmmTMB))
out_dir <- file.path("tests", "reference", "glmm_reml")
data_dir <- file.path("skmixed", "datasets", "data")

write_fit <- function(id, fit) {
  fe <- fixef(fit)$cond
  se <- sqrt(diag(vcov(fit)$cond))
  write.csv(data.frame(term = names(fe), estimate = unname(fe), se = unname(se[names(fe)])),
            file.path(out_dir, paste0(id, "_fixef.csv")), row.names = FALSE)
  vc <- VarCorr(fit)$cond
  rows <- list()
  for (g in names(vc)) {
    S <- vc[[g]]
    sd <- sqrt(diag(S))
    nm <- rownames(S)
    for (i in seq_along(nm)) rows[[length(rows) + 1]] <- data.frame(grp = g, var1 = nm[i], var2 = NA, vcov = S[i, i], sdcor = sd[i])
    if (length(nm) > 1) for (i in 1:(length(nm) - 1)) for (j in (i + 1):length(nm)) {
      rows[[length(rows) + 1]] <- data.frame(grp = g, var1 = nm[i], var2 = nm[j], vcov = S[j, i], sdcor = S[j, i] / (sd[i] * sd[j]))
    }
  }
  write.csv(do.call(rbind, rows), file.path(out_dir, paste0(id, "_varcorr.csv")), row.names = FALSE)
  write.csv(data.frame(loglik = as.numeric(logLik(fit)), objective = fit$fit$objective, nobs = nobs(fit),
                       convergence = fit$fit$convergence, pdHess = fit$sdr$pdHess,
                       theta = paste(format(fit$fit$par[names(fit$fit$par) == "theta"], digits = 17), collapse = ";"),
                       R = R.version.string, glmmTMB = as.character(packageVersion("glmmTMB")),
                       TMB = as.character(packageVersion("TMB"))),
            file.path(out_dir, paste0(id, "_summary.csv")), row.names = FALSE)
}

ctrl <- glmmTMBControl()  # defaults (a tighter rel.tol ends in "singular convergence (7)")

g <- read.csv(file.path(data_dir, "grouseticks.csv"),
              colClasses = c(INDEX = "character", BROOD = "character", LOCATION = "character", YEAR = "character"))
write_fit("grouse", glmmTMB(TICKS ~ YEAR + cHEIGHT + (1 | BROOD), family = poisson, data = g,
                            REML = TRUE, control = ctrl))

d <- read.csv(gzfile(file.path(data_dir, "zeb2_like.csv.gz")), stringsAsFactors = FALSE)
write_fit("zeb2", glmmTMB(ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment),
                          family = poisson, data = d, REML = TRUE, control = ctrl))

s <- read.csv(file.path("tests", "reference", "slopes_data.csv"), stringsAsFactors = FALSE)
write_fit("slopes", glmmTMB(y ~ x1 + x2 + offset(offset) + (1 + x1 | g), family = poisson, data = s,
                            REML = TRUE, control = ctrl))
