"""Benchmarks and hostile runs (`make bench`, `make hostile`): scripts, run from the tree."""
