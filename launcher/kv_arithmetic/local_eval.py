"""Exact match of greedy completions in one process, for plain models small enough to need no workers:
the demo's base models alone and the LoRA baseline. (Compositions are evaluated by `calm eval` on ZeRO-3
workers; both compare completions the same way: decoded and stripped.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from calm_dist.model.decoding import left_padded

# (left-padded prompt ids, their mask) -> the full sequences, prompts included
Complete = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def causal_lm_completer(model: nn.Module, max_new_tokens: int, pad_token_id: int, eos_token_id: int) -> Complete:
    """Greedy, KV-cached decoding of a plain Hugging Face causal LM (a PEFT-wrapped one included)."""

    def complete(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad_token_id, eos_token_id=eos_token_id)

    return complete


@torch.no_grad()
def exact_match(
    complete: Complete,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    batch_size: int = 64,
) -> float:
    """Share of records whose greedy completion (cut at eos, decoded, stripped) equals the completion.

    Prompts start with bos, as in training (calm_dist.data.tokenization.tokenize_records)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [bos + tokenizer.encode(r[prompt_field], add_special_tokens=False) for r in chunk]
        ids, mask = left_padded(prompts, pad)
        for row, record in zip(complete(ids, mask)[:, ids.shape[1]:].tolist(), chunk, strict=True):
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            hits += tokenizer.decode(row, skip_special_tokens=True).strip() == str(record[completion_field]).strip()
    return hits / len(records)
