## make_reference.R -- glmmTMB (family = nbinom2) and lme4::glmer.nb reference
## values for skmixed.NegativeBinomialGLMM.
##
## Run from the repository root (after python tests/reference/nbglmm/make_data.py):
##
##     Rscript tests/reference/nbglmm/make_reference.R
##
## Writes into tests/reference/nbglmm/:
##   owls.csv, salamanders.csv, salamanders_levels.csv   glmmTMB's example data
##   <id>_fixef.csv    term, estimate, se (at the polished maximum, below), and
##                     estimate_glmmtmb, se_glmmtmb (where glmmTMB's nlminb stopped)
##   <id>_summary.csv  loglik, size, size_se, log_size_se, sd, vcov, nobs, max_grad,
##                     max_grad_glmmtmb, loglik_glmmtmb, size_glmmtmb, elapsed
##                     (size_se = size * SE(log size) from TMB::sdreport)
##   <id>_ranef.csv    level, condval (b, the conditional modes: TMB's inner optimum)
##   <id>_glmernb.csv  term, estimate, plus rows "theta" and "loglik": lme4's glmer.nb
##   versions.csv
## ids: owls, salamanders, zeb2nb.
##
## glmmTMB's optimiser (nlminb) is run to rel.tol = 1e-12 and then polished by Newton
## steps on TMB's objective, so that the reference is the maximum of glmmTMB's Laplace
## likelihood and not where its optimiser stops.
suppressPackageStartupMessages({library(glmmTMB); library(lme4)})
options(digits = 17)
dir <- file.path("tests", "reference", "nbglmm")
ctrl <- glmmTMBControl(optCtrl = list(rel.tol = 1e-12, eval.max = 1e4, iter.max = 1e4))

write_fit <- function(id, formula, data, id_group) {
  t0 <- proc.time()[["elapsed"]]
  fit <- glmmTMB(formula, data = data, family = nbinom2, control = ctrl)
  elapsed <- proc.time()[["elapsed"]] - t0
  ## glmmTMB's nlminb stops with a gradient of up to 1e-2 (Owls: ArrivalTime is not
  ## centred); a few Newton steps on TMB's objective reach its maximum, which is the
  ## reference (glmmTMB's own stopping point is kept as estimate_glmmtmb).
  obj <- fit$obj
  par <- fit$fit$par
  raw_grad <- max(abs(obj$gr(par)))
  for (k in 1:6) {
    H <- optimHess(par, obj$fn, obj$gr)
    par <- par - solve(H, as.numeric(obj$gr(par)))
  }
  sdr <- TMB::sdreport(obj, par.fixed = par)
  s <- summary(sdr, "fixed")
  fe_raw <- fixef(fit)$cond
  b <- s[rownames(s) == "beta", , drop = FALSE]
  write.csv(data.frame(term = names(fe_raw), estimate = b[, 1], se = b[, 2],
                       estimate_glmmtmb = unname(fe_raw), se_glmmtmb = sqrt(diag(vcov(fit)$cond))),
            file.path(dir, paste0(id, "_fixef.csv")), row.names = FALSE)
  lsize <- s[rownames(s) %in% c("betadisp", "betad"), , drop = FALSE]
  lsd <- s[rownames(s) == "theta", , drop = FALSE]
  size <- exp(lsize[1, 1])
  ## ranef: the conditional modes at the polished parameters (TMB's last inner optimum)
  obj$fn(par)
  re <- obj$env$last.par[names(obj$env$last.par) == "b"]
  levs <- levels(factor(data[[id_group]]))
  write.csv(data.frame(loglik = -obj$fn(par), size = size, size_se = size * lsize[1, 2],
                       log_size_se = lsize[1, 2], sd = exp(lsd[1, 1]), vcov = exp(2 * lsd[1, 1]),
                       nobs = nobs(fit), max_grad = max(abs(obj$gr(par))), max_grad_glmmtmb = raw_grad,
                       loglik_glmmtmb = as.numeric(logLik(fit)), size_glmmtmb = sigma(fit), elapsed = elapsed),
            file.path(dir, paste0(id, "_summary.csv")), row.names = FALSE)
  write.csv(data.frame(level = levs, condval = re, condval_glmmtmb = ranef(fit)$cond[[1]][[1]]),
            file.path(dir, paste0(id, "_ranef.csv")), row.names = FALSE)
  t0 <- proc.time()[["elapsed"]]
  nb <- glmer.nb(formula, data = data)
  elapsed_nb <- proc.time()[["elapsed"]] - t0
  fe2 <- fixef(nb)
  write.csv(data.frame(term = c(names(fe2), "theta", "loglik", "sd", "elapsed"),
                       estimate = c(unname(fe2), getME(nb, "glmer.nb.theta"), as.numeric(logLik(nb)),
                                    attr(VarCorr(nb)[[1]], "stddev")[[1]], elapsed_nb)),
            file.path(dir, paste0(id, "_glmernb.csv")), row.names = FALSE)
  invisible(fit)
}

data(Owls, package = "glmmTMB")
Owls <- transform(Owls, NCalls = SiblingNegotiation)
write.csv(Owls[, c("Nest", "FoodTreatment", "SexParent", "ArrivalTime", "NCalls", "BroodSize", "logBroodSize")],
          file.path(dir, "owls.csv"), row.names = FALSE)
write_fit("owls", NCalls ~ (FoodTreatment + ArrivalTime) * SexParent + offset(logBroodSize) + (1 | Nest), Owls, "Nest")

data(Salamanders, package = "glmmTMB")
sal <- data.frame(site = as.character(Salamanders$site), spp = as.character(Salamanders$spp),
                  mined = as.character(Salamanders$mined), count = Salamanders$count)
write.csv(sal, file.path(dir, "salamanders.csv"), row.names = FALSE)
write.csv(rbind(data.frame(variable = "spp", level = levels(Salamanders$spp)),
                data.frame(variable = "mined", level = levels(Salamanders$mined))),
          file.path(dir, "salamanders_levels.csv"), row.names = FALSE)
write_fit("salamanders", count ~ spp * mined + (1 | site), Salamanders, "site")

zeb <- read.csv(file.path(dir, "zeb2_nb_data.csv.gz"))
zeb$cell_group <- factor(zeb$cell_group, levels = sort(unique(zeb$cell_group)))
write_fit("zeb2nb", y ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment), zeb, "patient_assignment")

write.csv(data.frame(package = c("R", "glmmTMB", "TMB", "lme4"),
                     version = c(R.version.string, as.character(packageVersion("glmmTMB")),
                                 as.character(packageVersion("TMB")), as.character(packageVersion("lme4")))),
          file.path(dir, "versions.csv"), row.names = FALSE)
