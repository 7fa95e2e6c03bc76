"""Helpers shared by tests, benchmarks and the demo, made here so that nothing downloads:

``tiny`` (seeded tiny HF checkpoints with the real tokenizer, their training config), ``models`` (the
tests' model zoo with fixed token ids, cached loading), ``prompts`` (prompt rows and batches),
``images`` (test images), ``mcd_sample`` (a small MCD-format dataset), ``checkpoints`` (reading and
rewriting checkpoint tensors), ``reference`` (transformers' outputs for parity), ``asserts``.
"""
