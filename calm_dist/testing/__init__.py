"""Tiny seeded models, tokenizers and checkpoints built in memory, for the tests, the benchmarks and the
demo (nothing is downloaded)."""
