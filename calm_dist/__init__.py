"""calm-dist's composition library: the composed model in plain PyTorch (calm_dist.model), its data
pipeline (calm_dist.data), the per-worker DeepSpeed training (calm_dist.distributed) and tiny models for
tests (calm_dist.testing).

The README's API is importable from here: compose, generate, save_composition, load_composition,
Connection, CompositionOptions (loaded on first use, so `import calm_dist` stays cheap)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "compose": "calm_dist.model.composed",
    "ComposedModel": "calm_dist.model.composed",
    "Connection": "calm_dist.model.connections",
    "CompositionOptions": "calm_dist.model.options",
    "generate": "calm_dist.model.decoding",
    "complete": "calm_dist.model.decoding",
    "save_composition": "calm_dist.model.composition_checkpoint",
    "load_composition": "calm_dist.model.composition_checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'calm_dist' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
