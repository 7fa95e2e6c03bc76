"""Benchmark scoring: ``registry`` (benchmarks by name), ``runner`` (generation, scoring, reports; ``cache`` keeps
generations, ``hosts`` splits a run over processes), ``sandbox/`` (runs generated code), one package per
benchmark (``chartmimic/``, ``design2code/``, ``mmcode/``, ``infibench/``), ``check`` (agreement with official
scores), ``report`` and ``paper`` (the paper's table)."""
