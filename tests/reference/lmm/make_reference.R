## =============================================================================
## make_reference.R -- lme4 / lmerTest reference values for skmixed.LinearMixedModel
## =============================================================================
##
## Run from the repository root:
##
##     Rscript tests/reference/lmm/make_reference.R
##
## Writes
##   skmixed/datasets/data/{sleepstudy,penicillin,pastes,insteval}.csv.gz  (lme4's data)
##   tests/reference/lmm/versions.csv            R, lme4, lmerTest, Matrix versions
##   tests/reference/lmm/<id>_fixef.csv           term, estimate, se, df, t, p (lmerTest
##                                                Satterthwaite, summary() of lmerTest::lmer)
##   tests/reference/lmm/<id>_vcov.csv            vcov(fit) (= sigma^2 (RX'RX)^-1)
##   tests/reference/lmm/<id>_varcorr.csv         as.data.frame(VarCorr(fit))
##   tests/reference/lmm/<id>_ranef.csv           as.data.frame(ranef(fit, condVar = TRUE))
##   tests/reference/lmm/<id>_summary.csv         loglik, deviance/REML criterion, AIC, BIC,
##                                                sigma, theta, nobs, elapsed seconds,
##                                                loglik and theta of the default-control fit
##   tests/reference/lmm/anova_sleep.csv          anova(indep, corr) (ML refits): LRT
##
## id = <data>_<reml|ml>, data in sleep_corr, sleep_indep, penicillin, pastes, insteval.
##
## Tight convergence: lme4's defaults (bobyqa, rhoend = 2e-7 scaled) stop a few 1e-6
## relative away from the optimum of the profiled deviance.  Every reference fit here
## uses lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5)),
## i.e. a tightly converged lmer; the default-control logLik and theta are kept in
## the summary (columns loglik_default, theta_default) to show the difference.
## The Satterthwaite df come from lmerTest at the same tight optimum.
## =============================================================================

suppressPackageStartupMessages({
    library(lme4)
    library(lmerTest)
})
options(digits = 17)

out_dir  <- file.path("tests", "reference", "lmm")
data_dir <- file.path("skmixed", "datasets", "data")
stopifnot(dir.exists(out_dir), dir.exists(data_dir))

fmt17 <- function(x) ifelse(is.na(x), "NA", sprintf("%.17g", x))
write_full <- function(df, file) {
    df <- as.data.frame(df, stringsAsFactors = FALSE)
    for (nm in names(df)) {
        if (is.factor(df[[nm]])) df[[nm]] <- as.character(df[[nm]])
        else if (is.numeric(df[[nm]])) df[[nm]] <- fmt17(df[[nm]])
    }
    write.csv(df, file, row.names = FALSE, quote = TRUE)
    invisible(file)
}
write_gz <- function(df, name) {
    con <- gzfile(file.path(data_dir, paste0(name, ".csv.gz")), "w")
    df <- as.data.frame(df)
    for (nm in names(df)) if (is.factor(df[[nm]])) df[[nm]] <- as.character(df[[nm]])
    write.csv(df, con, row.names = FALSE)
    close(con)
}

## ---------------------------------------------------------------------------
## Data (factor levels are characters; the loaders rebuild them)
## ---------------------------------------------------------------------------
data("sleepstudy", "Penicillin", "Pastes", "InstEval", package = "lme4")
write_gz(sleepstudy, "sleepstudy")
write_gz(Penicillin, "penicillin")
write_gz(Pastes, "pastes")
write_gz(InstEval, "insteval")

## Factors in C-locale order, as skmixed sorts levels
cf <- function(x) { x <- as.character(x); factor(x, levels = sort(unique(x), method = "radix")) }
sleep <- sleepstudy; sleep$Subject <- cf(sleep$Subject)
pen <- Penicillin; pen$plate <- cf(pen$plate); pen$sample <- cf(pen$sample)
pas <- Pastes; pas$batch <- cf(pas$batch); pas$cask <- cf(pas$cask)
ie <- InstEval
for (v in c("s", "d", "dept", "service")) ie[[v]] <- cf(ie[[v]])

cases <- list(
    sleep_corr  = list(Reaction ~ Days + (Days | Subject), sleep),
    sleep_indep = list(Reaction ~ Days + (Days || Subject), sleep),
    penicillin  = list(diameter ~ 1 + (1 | plate) + (1 | sample), pen),
    pastes      = list(strength ~ 1 + (1 | batch/cask), pas),
    insteval    = list(y ~ service + (1 | s) + (1 | d) + (1 | dept), ie)
)

tight <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5),
                     calc.derivs = FALSE)

fits <- list()
for (nm in names(cases)) {
    f <- cases[[nm]][[1]]; d <- cases[[nm]][[2]]
    for (reml in c(TRUE, FALSE)) {
        id <- paste0(nm, if (reml) "_reml" else "_ml")
        cat(id, "\n")
        t0 <- proc.time()[["elapsed"]]
        fd <- lme4::lmer(f, data = d, REML = reml)
        elapsed <- proc.time()[["elapsed"]] - t0
        fit <- lmerTest::lmer(f, data = d, REML = reml, control = tight)
        fits[[id]] <- fit
        co <- summary(fit, ddf = "Satterthwaite")$coefficients
        write_full(data.frame(term = rownames(co), estimate = co[, "Estimate"],
                              se = co[, "Std. Error"], df = co[, "df"], t = co[, "t value"],
                              p = co[, "Pr(>|t|)"]),
                   file.path(out_dir, paste0(id, "_fixef.csv")))
        V <- as.matrix(vcov(fit))
        write_full(data.frame(term = rownames(V), V, check.names = FALSE),
                   file.path(out_dir, paste0(id, "_vcov.csv")))
        vc <- as.data.frame(VarCorr(fit))
        write_full(vc, file.path(out_dir, paste0(id, "_varcorr.csv")))
        re <- as.data.frame(ranef(fit, condVar = TRUE))
        names(re) <- c("grp", "term", "level", "condval", "condsd")
        write_full(re[, c("grp", "level", "term", "condval", "condsd")],
                   file.path(out_dir, paste0(id, "_ranef.csv")))
        ll <- logLik(fit)
        write_full(data.frame(
            loglik = as.numeric(ll), df = attr(ll, "df"),
            objective = as.numeric(if (reml) getME(fit, "devcomp")$cmp[["REML"]]
                                   else getME(fit, "devcomp")$cmp[["dev"]]),
            AIC = AIC(fit), BIC = BIC(fit), sigma = sigma(fit),
            theta = paste(fmt17(getME(fit, "theta")), collapse = ";"),
            nobs = nobs(fit), elapsed_seconds_default = elapsed,
            loglik_default = as.numeric(logLik(fd)),
            theta_default = paste(fmt17(getME(fd, "theta")), collapse = ";")),
            file.path(out_dir, paste0(id, "_summary.csv")))
    }
}

## Likelihood-ratio test between nested fits (anova refits REML fits by ML)
a <- anova(fits[["sleep_indep_reml"]], fits[["sleep_corr_reml"]])
write_full(data.frame(model = c("indep", "corr"), npar = a$npar, logLik = a$logLik,
                      deviance = a$deviance, Chisq = a$Chisq, Df = a$Df,
                      p = a[["Pr(>Chisq)"]]),
           file.path(out_dir, "anova_sleep.csv"))

## InstEval timing: default lmer, 3 repeats
times <- sapply(1:3, function(i) system.time(
    lme4::lmer(y ~ service + (1 | s) + (1 | d) + (1 | dept), data = ie))[["elapsed"]])
write_full(data.frame(model = "insteval_reml", repeat_ = 1:3, elapsed = times),
           file.path(out_dir, "insteval_lmer_time.csv"))

write_full(data.frame(
    package = c("R", "lme4", "lmerTest", "Matrix"),
    version = c(R.version.string, as.character(packageVersion("lme4")),
                as.character(packageVersion("lmerTest")), as.character(packageVersion("Matrix")))),
    file.path(out_dir, "versions.csv"))
cat("done\n")
