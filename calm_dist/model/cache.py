"""Decoding state of a composed model: each base model keeps its own KV cache (the anchor's and the
augmenting models' must never be shared), and each connection caches its projected keys and values.
Augmenting models with a tokenizer of their own also need the anchor ids so far (their text), each
row's settled tokens, and which of their cached positions are real."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class ComposedCache:
    anchor: DynamicCache
    augmenting: list[DynamicCache]
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor_ids: torch.Tensor | None = None  # cross-tokenizer only: every anchor id so far
    rows: list | None = None  # cross-tokenizer only: calm_dist.model.alignment.RowState per row
    augmenting_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # model k -> [batch, cached]
    readable_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # hide_unknown_tokens: k -> [batch, cached]

    def seq_length(self) -> int:
        return self.anchor.get_seq_length()

    def extend(self, name: str, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one connection's new keys/values along the sequence; return all of them so far."""
        if name in self.keys:
            keys = torch.cat([self.keys[name], keys], dim=2)
            values = torch.cat([self.values[name], values], dim=2)
        self.keys[name], self.values[name] = keys, values
        return keys, values
