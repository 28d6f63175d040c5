"""Reproducible benchmarks, each against a named peer measured in the same run."""
