"""Helpers shared by tests, benchmarks and the demo: tiny seeded checkpoints and test inputs."""
