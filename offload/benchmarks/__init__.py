"""Benchmarks that ship with the package (`offload bench NAME`); results go to bench/results/."""
