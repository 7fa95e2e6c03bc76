"""Benchmark scoring: ``registry`` (benchmarks by name), ``runner`` (cached generation, scoring, reports),
``sandbox/`` (runs generated code), one package per benchmark (``chartmimic/``, ``design2code/``, ``mmcode/``,
``infibench/``), ``check`` (agreement with official scores), ``report`` and ``paper`` (the paper's table)."""
