"""Streaming, sharded model merges (LM-Cocktail and friends): `calm merge config.yaml`.

Subpackages, one concern each (mergekit's split):
- merge.io: files. safetensors_file (header validation, streaming writer), checkpoint_folder (a Hugging
  Face folder's tensors), reader (chunks of the inputs, read ahead in planned order), manifest (resume
  and verify), output_folder (the output folder and its copied files), report.
- merge.planning: what to compute. inputs (matching tensors across inputs, and those dropped by a rule),
  vocab (vocabularies: checked alike, or remapped by token under `tokenizer:`), plan (output tensors,
  shards, chunk size), memory (a merge's memory and time, for `calm plan`).
- merge.execution: running it. stream (one tensor as chunks), vocab_rows (a vocabulary tensor remapped
  by token, merged whole), shard (one shard task), local (local processes), ray_runner (Ray tasks),
  ray_session (Ray around a step), partitioned_losses (Cocktail losses over ZeRO-3 Ray workers).
- merge.methods: the formulas. specs (each method's parameters and shape, free of torch), registry
  (merge formulas by name), exact (correctly rounded linear combinations; fast_kernel builds its
  compiled pass, fast_pass.c).
- merge.cocktail: LM-Cocktail's recipe. examples (the JSONL examples), losses (a candidate's loss),
  weights (softmax(-loss / T) and fixed weights).
Beside them: merge_config (the validated YAML), merge_errors, job (the whole sequence, and
cocktail_weights, which picks where the losses are computed).

The entry points are importable from here, lazily (`import merge` loads no torch): run_merge,
cocktail_weights (merge.job), load_config (merge.merge_config) and verify (merge.io.manifest).
"""

from __future__ import annotations

import importlib

_ENTRY_POINTS = {
    "run_merge": "merge.job",
    "cocktail_weights": "merge.job",
    "load_config": "merge.merge_config",
    "verify": "merge.io.manifest",
}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'merge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
