"""slmops benchmarks (`make bench`): side-by-side ratios in one run, never asserted."""
