"""Benchmark scoring: the sandbox that runs generated code, and one module per benchmark."""
