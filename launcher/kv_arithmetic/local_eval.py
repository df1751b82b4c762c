"""Exact match of greedy completions in one process, for plain models small enough to need no workers:
the experiment's base models alone and its LoRA baseline. They decode through the same loop as
compositions (calm_dist.model.decoding) and are compared the same way as `calm eval` compares them:
decoded, cut at EOS and stripped."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from calm_dist.model.decoding import SingleModel, complete


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    max_new_tokens: int,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    batch_size: int = 64,
) -> float:
    """Share of records whose greedy completion by `model` (a plain causal LM, a PEFT-wrapped one
    included) equals the record's completion."""
    completions = complete(SingleModel(model), tokenizer, [r[prompt_field] for r in records],
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = sum(c.strip() == str(r[completion_field]).strip() for c, r in zip(completions, records, strict=True))
    return hits / len(records)
