"""Benchmark scripts of idrecog, run from the repository root as modules: ``python -m benchmarks.NAME``.

:mod:`benchmarks.common` holds what they share."""
