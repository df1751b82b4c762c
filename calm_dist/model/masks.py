"""Positions and masks of padded batches: position ids that count only real tokens, and which augmenting
positions each new anchor position may attend to (causal, never padding)."""

from __future__ import annotations

import torch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left- and right-padded rows get the positions
    an unpadded row would."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cross_attention_mask(attention_mask: torch.Tensor, past: int, length: int) -> torch.Tensor | None:
    """Which augmenting positions each new anchor position may attend to: bool [batch, 1, length,
    past + length], or None when plain causal attention is already exact.

    Query at sequence index t may see augmenting index s <= t that is not padding. Without a cache and
    with padding only on the right, causality alone hides every pad key from every real query, so the
    fast causal kernel gives the same real-position outputs.
    """
    if past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    query_index = torch.arange(past, past + length, device=attention_mask.device)
    key_index = torch.arange(past + length, device=attention_mask.device)
    causal = key_index[None, :] <= query_index[:, None]
    return causal[None, None] & attention_mask.bool()[:, None, None, :]
