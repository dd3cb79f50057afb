"""The project's benchmark suite: ``python -m benchmarks --list``, ``python -m benchmarks CASE [--quick]``.

Each case is a module of ``benchmarks/cases`` (registered in ``benchmarks/suite.py``); shared helpers live
in ``benchmarks/common``. benchmarks/README.md holds every measured figure with the command that made it.
"""
