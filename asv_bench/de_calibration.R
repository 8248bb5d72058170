## Pseudobulk differential expression with edgeR (quasi-likelihood) and limma-voom,
## called by asv_bench/de_calibration.py on the per-patient sums of its simulated
## cells.
##
##     Rscript asv_bench/de_calibration.R <dir>
##
## Reads, for each analysis a in {between, within}, <dir>/<a>_counts.csv (genes x
## samples, first column the gene), <dir>/<a>_samples.csv (sample, patient, group,
## lib_size); fits
##   between: ~ group                (group: diseased / healthy, one sample per patient)
##   within:  ~ patient + group      (group: rectum / blood, paired within patients)
## with the library sizes (sums of the cells' total counts) as given, and writes
## <dir>/<a>_<method>.csv (gene, p_value) and <dir>/times.csv (method, analysis, seconds).
suppressPackageStartupMessages({
  library(edgeR)
  library(limma)
})
dir <- commandArgs(trailingOnly = TRUE)[1]
times <- list()
for (a in c("between", "within")) {
  counts <- as.matrix(read.csv(file.path(dir, paste0(a, "_counts.csv")), row.names = 1, check.names = FALSE))
  samples <- read.csv(file.path(dir, paste0(a, "_samples.csv")), stringsAsFactors = FALSE)
  group <- factor(samples$group)
  design <- if (a == "between") model.matrix(~ group) else model.matrix(~ factor(samples$patient) + group)
  coef <- ncol(design)  # the group effect is the last column

  t0 <- proc.time()[["elapsed"]]
  y <- DGEList(counts, lib.size = samples$lib_size)
  y <- estimateDisp(y, design)
  fit <- glmQLFit(y, design)
  res <- glmQLFTest(fit, coef = coef)
  times[[length(times) + 1]] <- data.frame(method = "edgeR QL", analysis = a,
                                           seconds = proc.time()[["elapsed"]] - t0)
  write.csv(data.frame(gene = rownames(counts), p_value = res$table$PValue),
            file.path(dir, paste0(a, "_edgeR.csv")), row.names = FALSE)

  t0 <- proc.time()[["elapsed"]]
  v <- voom(DGEList(counts, lib.size = samples$lib_size), design)
  fit <- eBayes(lmFit(v, design))
  times[[length(times) + 1]] <- data.frame(method = "limma-voom", analysis = a,
                                           seconds = proc.time()[["elapsed"]] - t0)
  write.csv(data.frame(gene = rownames(counts), p_value = fit$p.value[, coef]),
            file.path(dir, paste0(a, "_limma.csv")), row.names = FALSE)
}
write.csv(do.call(rbind, times), file.path(dir, "times.csv"), row.names = FALSE)
cat(sprintf("edgeR %s, limma %s\n", packageVersion("edgeR"), packageVersion("limma")),
    file = file.path(dir, "versions.txt"))
