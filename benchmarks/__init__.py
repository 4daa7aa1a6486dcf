"""Benchmark and measurement scripts (run as files). A package so that tests import their shared
helpers as `benchmarks.<module>` (e.g. `random_weights.small_random_policy`) whatever else is installed."""
