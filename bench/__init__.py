"""The benchmarks ``make bench`` runs (bench/run.py); not part of the distribution."""
