"""asv benchmarks for skmixed."""
