"""Benchmark cases: one module each, ``main(argv) -> result`` printing Markdown to stdout (benchmarks/suite.py)."""
