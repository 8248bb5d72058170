## =============================================================================
## make_reference.R -- R reference values for skmixed's mean-plus-offset models
## =============================================================================
##
## Run from the repository root (reads data.csv, written once by make_data.py):
##
##     Rscript tests/reference/offset/make_reference.R
##
## Model: y ~ 1 + offset(o), prior weights w (none, a 0/1 treatment indicator, or
## membership probabilities in [0, 1]), for each response y_nb, y_low, y_pois:
##
##   poisson   glm(family = poisson)                          summary() SEs
##   nb_fixed  glm(family = MASS::negative.binomial(size))    summary(fit, dispersion = 1):
##             size in 0.7, 2.5, 10                           the Fisher-information SE (R's
##                                                            default scales by a Pearson
##                                                            dispersion estimate)
##   glm_nb    MASS::glm.nb (size estimated by ML)            summary() (negbin: dispersion 1)
##
## Every fit is iterated to round-off (glm.control(epsilon = 1e-14, maxit = 500))
## rather than R's default 1e-8, so that the references are exact to ~1e-10 and a
## comparison at 1e-6 tests skmixed, not R's stopping rule.
##
## Writes tests/reference/offset/fits.csv: response, weights, model, size (the fixed
## size, NA otherwise), estimate, std_error, theta (glm_nb), theta_se, converged,
## iterations, loglik (logLik(fit), every constant included); distill.csv (see
## below) and versions.csv.

suppressPackageStartupMessages(library(MASS))
here <- "tests/reference/offset"
d <- read.csv(file.path(here, "data.csv"))
ctrl <- glm.control(epsilon = 1e-14, maxit = 500)
weights_list <- list(none = rep(1, nrow(d)), w_treat = d$w_treat, w_prob = d$w_prob)
rows <- list()
add <- function(response, wname, model, size, fit, est_se, theta = NA, theta_se = NA) {
  rows[[length(rows) + 1]] <<- data.frame(
    response = response, weights = wname, model = model, size = size,
    estimate = est_se[1], std_error = est_se[2], theta = theta, theta_se = theta_se,
    converged = fit$converged, iterations = fit$iter, loglik = as.numeric(logLik(fit))
  )
}
for (response in c("y_nb", "y_low", "y_pois")) {
  for (wname in names(weights_list)) {
    dd <- data.frame(y = d[[response]], o = d$o, w = weights_list[[wname]])
    fit <- glm(y ~ 1 + offset(o), family = poisson, weights = w, data = dd, control = ctrl)
    add(response, wname, "poisson", NA, fit, summary(fit)$coefficients[1, 1:2])
    for (size in c(0.7, 2.5, 10)) {
      fit <- glm(y ~ 1 + offset(o), family = negative.binomial(size), weights = w, data = dd,
                 control = ctrl)
      add(response, wname, "nb_fixed", size, fit, summary(fit, dispersion = 1)$coefficients[1, 1:2])
    }
    ## no overdispersion (y_pois) sends theta to infinity: theta.ml then fails with NaN,
    ## recorded as a row of NA (skmixed reports size_ = inf and the Poisson fit there)
    fit <- tryCatch(suppressWarnings(glm.nb(y ~ 1 + offset(o), weights = w, data = dd, control = ctrl)),
                    error = function(e) { message(response, "/", wname, ": ", conditionMessage(e)); NULL })
    if (is.null(fit)) {
      rows[[length(rows) + 1]] <- data.frame(
        response = response, weights = wname, model = "glm_nb", size = NA, estimate = NA,
        std_error = NA, theta = NA, theta_se = NA, converged = FALSE, iterations = NA, loglik = NA)
    } else {
      add(response, wname, "glm_nb", NA, fit, summary(fit)$coefficients[1, 1:2], fit$theta, fit$SE.theta)
    }
  }
}
out <- do.call(rbind, rows)
write.csv(out, file.path(here, "fits.csv"), row.names = FALSE)

## Distillation and treatment model of the resampling test, with o as a covariate
## (free coefficient): glm.nb / glm(poisson) of each response on o, and the logistic
## regression of w_treat on o. Writes distill.csv: response, model, term, estimate,
## std_error, theta.
drows <- list()
for (response in c("y_nb", "y_low")) {
  dd <- data.frame(y = d[[response]], o = d$o)
  fit <- glm.nb(y ~ o, data = dd, control = ctrl)
  cf <- summary(fit)$coefficients
  drows[[length(drows) + 1]] <- data.frame(response = response, model = "glm_nb", term = rownames(cf),
                                           estimate = cf[, 1], std_error = cf[, 2], theta = fit$theta)
  fit <- glm(y ~ o, family = poisson, data = dd, control = ctrl)
  cf <- summary(fit)$coefficients
  drows[[length(drows) + 1]] <- data.frame(response = response, model = "poisson", term = rownames(cf),
                                           estimate = cf[, 1], std_error = cf[, 2], theta = NA)
}
fit <- glm(w_treat ~ o, family = binomial, data = d, control = ctrl)
cf <- summary(fit)$coefficients
drows[[length(drows) + 1]] <- data.frame(response = "w_treat", model = "logistic", term = rownames(cf),
                                         estimate = cf[, 1], std_error = cf[, 2], theta = NA)
write.csv(do.call(rbind, drows), file.path(here, "distill.csv"), row.names = FALSE)
write.csv(data.frame(R = R.version.string, MASS = as.character(packageVersion("MASS"))),
          file.path(here, "versions.csv"), row.names = FALSE)
print(out, digits = 12)
