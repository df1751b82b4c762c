"""Decoding: the one loop every completion goes through (`calm generate`, `calm eval`'s lockstep greedy
decoding, the experiment's baselines), and the text around it: prompts as bos + tokens, left padding,
the cut at EOS.

As in the paper, decoding is iterative: every new token goes into the anchor *and* the augmenting
models, each advancing its own KV cache (ComposedModel does this; a plain model runs behind SingleModel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from calm_dist.model.cache import ComposedCache
from calm_dist.model.composed import ComposedOutput
from calm_dist.model.masks import positions_from_mask
from calm_dist.model.objectives import next_token_loss

# (every token id so far [batch, length], their attention mask, step) -> the last position's logits
NextLogits = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class SingleModel(nn.Module):
    """One base model behind the composed model's calling convention (and KV cache), so the same
    decoding and evaluation serve the baseline rows: the anchor alone, an augmenting model alone, a
    LoRA-tuned anchor. It has no parameters of its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.anchor = model.requires_grad_(False).eval()

    def new_cache(self) -> ComposedCache:
        return ComposedCache(anchor=DynamicCache(config=self.anchor.config), augmenting=[])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, augmenting_states: dict | None = None,
                cache: ComposedCache | None = None, **_) -> ComposedOutput:
        past = cache.seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        logits = self.anchor(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask)[:, -input_ids.shape[1]:],
            past_key_values=cache.anchor if cache is not None else None, use_cache=cache is not None,
        ).logits
        return ComposedOutput(logits=logits, loss=next_token_loss(logits, labels) if labels is not None else None)


# --------------------------------------------------------------------------------------------------
# Text in and out


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, else its EOS (many decoders have no pad token), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def prompt_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Each prompt as bos + its tokens, as in training (calm_dist.data.tokenization adds bos itself)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer.encode(text, add_special_tokens=False) for text in texts]


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded on the left, so new tokens can go on the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the left so that new tokens can be appended on the right."""
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)  # pads (0) first, order kept
    ids = torch.gather(input_ids, 1, order)
    mask = torch.gather(attention_mask, 1, order)
    return ids.masked_fill(mask == 0, pad_token_id), mask


def cut_at_eos(rows: list[list[int]], eos_token_id: int | None) -> list[list[int]]:
    """Each generated row up to (not including) its first EOS."""
    if eos_token_id is None:
        return rows
    return [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in rows]


# --------------------------------------------------------------------------------------------------
# The loop


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
def decode(
    next_logits: NextLogits,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    all_finished: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Left-padded prompts followed by up to max_new_tokens tokens per row, greedy or sampled.

    next_logits(ids, mask, step) gives the last position's logits; a cached caller feeds only the new
    token after step 0. A row that produced EOS gets pad tokens (masked out) from then on. Decoding
    stops when all_finished(finished rows) says so: by default when every row here has finished; the
    distributed side makes it a collective, so that every rank runs the same number of steps.
    on_token, if given, receives each step's new tokens ([batch]) as they come (streaming).
    """
    if do_sample and temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling (use do_sample=False for greedy)")
    all_finished = all_finished or (lambda finished: bool(finished.all()))
    ids, mask = input_ids, attention_mask
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        logits = next_logits(ids, mask, step).float()
        if do_sample:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, pad_token_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
        if on_token is not None:
            on_token(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
            if all_finished(finished):
                break
    return ids


def generate(
    model: nn.Module,
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
    """Prompts (left- or right-padded) followed by up to max_new_tokens generated tokens per row, from a
    ComposedModel (or a SingleModel), with the KV caches of every model it runs.

    Rows that produced eos_token_id are padded with pad_token_id from then on; decoding stops when every
    row has finished.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = left_align(input_ids, attention_mask, pad_token_id)
    cache = model.new_cache()

    def next_logits(ids: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        new = ids if step == 0 else ids[:, -1:]
        return model(new, attention_mask=mask, cache=cache).logits[:, -1]

    return decode(next_logits, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, do_sample=do_sample,
                  temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, on_token=on_token)


def complete(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
    on_token: Callable[[torch.Tensor], None] | None = None,
    **sampling,
) -> list[str]:
    """The completion of each text prompt (the decoded tokens after it, up to EOS), from a ComposedModel
    or a SingleModel, in batches. sampling: do_sample, temperature, top_k, top_p (greedy by default;
    sampled ones are seeded). on_token: as for decode()."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed) if sampling.get("do_sample") else None
    completions = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompt_ids(tokenizer, prompts[start:start + batch_size]), pad)
        out = generate(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, generator=generator,
                       on_token=on_token, **sampling)
        rows = cut_at_eos(out[:, ids.shape[1]:].tolist(), tokenizer.eos_token_id)
        completions += [tokenizer.decode(row) for row in rows]
    return completions
