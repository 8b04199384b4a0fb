"""Benchmarks. Each prints a ratio against a baseline measured in the same run and ends with
one JSON line on stdout."""
