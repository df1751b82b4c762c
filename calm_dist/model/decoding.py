"""Iterative decoding of a composed model, as in the paper: every new token goes into the anchor *and*
the augmenting models, each advancing its own KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from calm_dist.model.composed import ComposedModel


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the left so that new tokens can be appended on the right."""
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)  # pads (0) first, order kept
    ids = torch.gather(input_ids, 1, order)
    mask = torch.gather(attention_mask, 1, order)
    return ids.masked_fill(mask == 0, pad_token_id), mask


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded on the left, so new tokens can go on the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the best token always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: ComposedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Prompts (left- or right-padded) followed by up to max_new_tokens generated tokens per row.

    Rows that produced eos_token_id are padded with pad_token_id from then on; decoding stops when every
    row has finished. on_token, if given, receives each step's new tokens ([batch]) as they come
    (streaming).
    """
    if do_sample and temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling (use do_sample=False for greedy)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = left_align(input_ids, attention_mask, pad_token_id)
    cache = model.new_cache()
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    sequence, step_input = input_ids, input_ids
    for _ in range(max_new_tokens):
        logits = model(step_input, attention_mask=attention_mask, cache=cache).logits[:, -1].float()
        if do_sample:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, pad_token_id)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        if on_token is not None:
            on_token(token)
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if finished.all():
            break
        step_input = token[:, None]
    return sequence
