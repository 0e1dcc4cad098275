"""Benchmarks of kdfast's ops: one module ``bench_<family>.py`` per op family, run by
``python -m benchmarks.run`` (see benchmarks/README.md). Not part of the test suite."""
