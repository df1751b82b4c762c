"""Held-out evaluation under ZeRO-3: mean loss over the predicted tokens, and exact match of greedy
completions decoded with KV caches (recomputed instead when an augmenting model reads the text through
a tokenizer of its own: each new anchor token can re-split its tail).

ZeRO-3 gathers each parameter collectively when its module runs, so every rank must run the same
sequence of forwards. Records are therefore cut into micro-batches dealt round-robin to the ranks; a
rank left one short runs a filler micro-batch that counts nowhere; and greedy decoding stops only when
every row of every rank has finished (one tiny all-reduce per token), so all ranks run the same number
of decoding steps. The same code runs in one process without torch.distributed (world of one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from calm_dist.data.batches import collate
from calm_dist.data.tokenization import IGNORE_INDEX
from calm_dist.distributed.collectives import all_sum, everyone
from calm_dist.model.alignment import views_from_batch
from calm_dist.model.augmenting import augmenting_states
from calm_dist.model.cache import ComposedCache
from calm_dist.model.connections import Connection
from calm_dist.model.decoding import NextLogits, cut_at_eos, decode, left_padded, prompt_ids
from calm_dist.model.masks import positions_from_mask

# (all token ids so far, attention mask, how many of them are new, the decoding cache or None)
# -> augmenting states of the new tokens. None when the model has no augmenting models.
DecodeStates = Callable[[torch.Tensor, torch.Tensor, int, "ComposedCache | None"], dict]


def rank_chunks(count: int, micro_batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of the indices 0..count-1, each with whether it counts.

    Chunks of micro_batch_size consecutive indices are dealt round-robin, so each index is evaluated
    exactly once over all ranks. Every rank gets the same number of chunks: a rank left short repeats
    chunk 0 as a filler that counts nowhere (ZeRO-3 needs every rank to run the same forwards).
    """
    chunks = [list(range(s, min(s + micro_batch_size, count))) for s in range(0, count, micro_batch_size)]
    per_rank = -(-len(chunks) // world_size)
    mine = []
    for i in range(per_rank):
        j = i * world_size + rank
        mine.append((chunks[j], True) if j < len(chunks) else (chunks[0], False))
    return mine


def new_cache_for(model: nn.Module, augmenting: Sequence[nn.Module] = ()) -> ComposedCache:
    """An empty decoding cache for a ComposedModel or SingleModel (unwrapped), with one cache per
    augmenting model that runs beside it."""
    return ComposedCache(anchor=DynamicCache(config=model.anchor.config),
                         augmenting=[DynamicCache(config=m.config) for m in augmenting])


def colocated_decode_states(models: Sequence[nn.Module], connections: Sequence[Connection]) -> DecodeStates:
    """Augmenting states of the new tokens from models on this rank, advancing their own caches."""

    def states(ids: torch.Tensor, mask: torch.Tensor, new: int, cache: ComposedCache | None) -> dict:
        return augmenting_states(models, connections, ids[:, -new:], mask, positions_from_mask(mask)[:, -new:],
                                 cache.augmenting if cache is not None else None)

    return states


def recomputed_decode_states(states_for: Callable[[dict], dict]) -> DecodeStates:
    """Augmenting states of the new tokens from a function of whole sequences (the pipelined client,
    whose augmenting ranks keep no decoding cache): the whole prefix is recomputed there, the anchor
    still decodes with its cache."""

    def states(ids: torch.Tensor, mask: torch.Tensor, new: int, cache: ComposedCache | None) -> dict:
        return {k: v[:, -new:] for k, v in states_for({"input_ids": ids, "attention_mask": mask}).items()}

    return states


@torch.no_grad()
def greedy_completions(
    model, prompts: Sequence[Sequence[int]], decode_states: DecodeStates | None,
    new_cache: Callable[[], ComposedCache], max_new_tokens: int, pad_token_id: int, eos_token_id: int | None,
    device: torch.device | str = "cpu", use_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuation of each prompt, cut before EOS, in lockstep with the other ranks.

    With use_cache, the prompts go through the model once and then each new token alone (the anchor's,
    the augmenting models' and the connections' caches advance); without, the whole prefix is
    recomputed at every step (the reference the cached path must equal).
    """
    cache = new_cache() if use_cache else None

    def next_logits(ids: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        new = 1 if use_cache and step else ids.shape[1]
        states = decode_states(ids, mask, new, cache) if decode_states is not None else None
        return model(ids[:, -new:], mask, augmenting_states=states, cache=cache).logits[:, -1]

    return _lockstep_greedy(next_logits, prompts, max_new_tokens, pad_token_id, eos_token_id, device)


@torch.no_grad()
def aligned_greedy_completions(
    model, prompts: Sequence[Sequence[int]], states_for: Callable[[dict], dict], max_new_tokens: int,
    pad_token_id: int, eos_token_id: int | None, device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Greedy continuation, cut before EOS, of a composition whose aligner gives augmenting models their
    own tokens: every step re-aligns the text so far (Aligner.extend_batch) and recomputes the prefix."""
    aligner = _aligner(model)

    def next_logits(ids: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in aligner.extend_batch({"input_ids": ids, "attention_mask": mask}).items()}
        return model(ids, mask, augmenting_states=states_for(batch), augmenting_views=views_from_batch(batch)).logits[:, -1]

    return _lockstep_greedy(next_logits, prompts, max_new_tokens, pad_token_id, eos_token_id, device)


def _lockstep_greedy(next_logits: NextLogits, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     pad_token_id: int, eos_token_id: int | None, device: torch.device | str) -> list[list[int]]:
    """The one decoding loop, stopping only when every row of every rank has finished."""
    ids, mask = left_padded(prompts, pad_token_id)
    out = decode(next_logits, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                 eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                 all_finished=lambda finished: everyone(bool(finished.all())))
    return cut_at_eos(out[:, ids.shape[1]:].tolist(), eos_token_id)


def _aligner(model):
    """The composition's aligner when some augmenting model has a tokenizer of its own, else None."""
    return getattr(getattr(model, "module", model), "aligner", None)


@dataclass
class EvalShare:
    """One rank's part of an evaluation set. Every rank holds the same number of micro-batches."""

    loss_batches: list[dict[str, torch.Tensor]]  # labels all -100 in fillers
    prompt_batches: list[tuple[list[list[int]], list[str], bool]] = field(default_factory=list)  # (prompts, targets, counts)
    prompt_texts: list[list[str]] = field(default_factory=list)


def eval_share(records, tokenized, tokenizer, *, micro_batch_size: int, rank: int, world_size: int,
               pad_token_id: int, prompt_field: str | None, completion_field: str | None,
               augmenting_pad_ids: Sequence[int] = ()) -> EvalShare:
    """This rank's micro-batches: `tokenized` rows (calm_dist.data.tokenization.tokenize_records) for the loss, and
    prompts with their target completions from `records` for exact match (prompt/completion data).
    augmenting_pad_ids: as for collate, when rows carry augmenting models' own tokens."""
    loss_batches = []
    for indices, counts in rank_chunks(len(tokenized), micro_batch_size, rank, world_size):
        batch = collate([tokenized[i] for i in indices], pad_token_id, augmenting_pad_ids)
        if not counts:
            batch["labels"].fill_(IGNORE_INDEX)
        loss_batches.append(batch)
    share = EvalShare(loss_batches)
    if prompt_field is not None:
        for indices, counts in rank_chunks(len(records), micro_batch_size, rank, world_size):
            texts = [records[i][prompt_field] for i in indices]
            prompts = prompt_ids(tokenizer, texts)
            share.prompt_batches.append((prompts, [records[i][completion_field] for i in indices], counts))
            share.prompt_texts.append(texts)
    return share


@torch.no_grad()
def evaluate(
    model, share: EvalShare, *, decode, states_for: Callable[[dict], dict] | None,
    decode_states: DecodeStates | None, new_cache: Callable[[], ComposedCache], max_new_tokens: int,
    pad_token_id: int, eos_token_id: int | None, device: torch.device | str = "cpu",
    on_progress: Callable[[int], None] | None = None, examples: int = 0,
) -> dict:
    """eval_loss (mean next-token loss over all predicted tokens of all ranks), and for prompt/completion
    data eval_exact_match (share of greedy completions that, decoded and stripped, equal the stripped
    target) with eval_samples. `examples` of this rank's first completions come back as
    `eval_examples`. on_progress(micro-batches done) after each micro-batch."""
    done = 0
    loss_sum, tokens = 0.0, 0
    for batch in share.loss_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        states = states_for(batch) if states_for is not None else None
        views = views_from_batch(batch)
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], augmenting_states=states,
                     **({"augmenting_views": views} if views is not None else {})).loss
        predicted = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if predicted:  # a filler's loss is NaN (nothing to predict) and counts nowhere
            loss_sum += loss.item() * predicted
            tokens += predicted
        done += 1
        if on_progress is not None:
            on_progress(done)
    hits, samples, shown = 0, 0, []
    for (prompts, targets, counts), texts in zip(share.prompt_batches, share.prompt_texts, strict=True):
        if _aligner(model) is not None:
            completions = aligned_greedy_completions(model, prompts, states_for, max_new_tokens, pad_token_id,
                                                     eos_token_id, device)
        else:
            completions = greedy_completions(model, prompts, decode_states, new_cache, max_new_tokens,
                                             pad_token_id, eos_token_id, device)
        if counts:
            for text, completion, target in zip(texts, completions, targets, strict=True):
                answer = decode(completion).strip()
                hits += answer == target.strip()
                if len(shown) < examples:
                    shown.append({"prompt": text, "target": target, "completion": answer})
            samples += len(prompts)
        done += 1
        if on_progress is not None:
            on_progress(done)
    loss_sum, tokens, hits, samples = all_sum([loss_sum, tokens, hits, samples])
    metrics = {"eval_loss": loss_sum / max(1.0, tokens)}
    if share.prompt_batches:
        metrics.update(eval_exact_match=hits / max(1.0, samples), eval_samples=int(samples))
    if examples:
        metrics["eval_examples"] = shown
    return metrics
