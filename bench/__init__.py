"""Benchmarks (`python -m bench.serve`) and the load/checking tools they share with tests."""
