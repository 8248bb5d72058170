## make_reference_reml.R -- glmmTMB nbinom2 with REML = TRUE on the Owls and Salamanders
## data written by make_reference.R (run that first), for NegativeBinomialGLMM(reml=True).
##
##     Rscript tests/reference/nbglmm/make_reference_reml.R
##
## Writes <id>_reml_fixef.csv (term, estimate, se = sqrt(diag(vcov(fit)$cond))) and
## <id>_reml_summary.csv (loglik = logLik(fit), the REML log-likelihood; size =
## sigma(fit); sd of the random intercept; max_grad), ids owls and salamanders.
suppressPackageStartupMessages(library(glmmTMB))
dir <- file.path("tests", "reference", "nbglmm")
Owls <- read.csv(file.path(dir, "owls.csv"))
sal <- read.csv(file.path(dir, "salamanders.csv"))
lv <- read.csv(file.path(dir, "salamanders_levels.csv"))
sal$spp <- factor(sal$spp, levels = lv$level[lv$variable == "spp"])
sal$mined <- factor(sal$mined, levels = lv$level[lv$variable == "mined"])
for (case in c("owls", "salamanders")) {
  f <- if (case == "owls") NCalls ~ (FoodTreatment + ArrivalTime) * SexParent + offset(logBroodSize) + (1 | Nest) else count ~ spp * mined + (1 | site)
  d <- if (case == "owls") Owls else sal
  fit <- glmmTMB(f, data = d, family = nbinom2, REML = TRUE,
                 control = glmmTMBControl(optCtrl = list(rel.tol = 1e-12, eval.max = 1e4, iter.max = 1e4)))
  fe <- fixef(fit)$cond
  write.csv(data.frame(term = names(fe), estimate = unname(fe), se = sqrt(diag(vcov(fit)$cond))),
            file.path(dir, paste0(case, "_reml_fixef.csv")), row.names = FALSE)
  write.csv(data.frame(loglik = as.numeric(logLik(fit)), size = sigma(fit),
                       sd = attr(VarCorr(fit)$cond[[1]], "stddev")[[1]], max_grad = max(abs(fit$sdr$gradient.fixed))),
            file.path(dir, paste0(case, "_reml_summary.csv")), row.names = FALSE)
}
