"""Benchmarks (not part of the installed package); a package so tests can import the shared workloads."""
