"""Held-out evaluation under ZeRO-3: mean loss, and exact match of greedy completions.

Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively), so greedy
decoding here runs a fixed number of steps and recomputes the prefix each step instead of stopping
early per rank.
"""

from __future__ import annotations

import torch

from calm_dist.alignment import views_from_batch
from calm_dist.evaluation import cut_at_eos
from calm_dist.train_loop import StatesFor, global_sum


@torch.no_grad()
def eval_loss(engine, batches: list[dict[str, torch.Tensor]], states_for: StatesFor) -> float:
    total, count = 0.0, 0
    for batch in batches:
        loss = engine(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                      augmenting_states=states_for(batch), augmenting_views=views_from_batch(batch)).loss
        predicted = int((batch["labels"][:, 1:] != -100).sum())
        total += loss.item() * predicted
        count += predicted
    return global_sum(total) / max(1.0, global_sum(count))


@torch.no_grad()
def greedy_completions(
    engine, prompts: list[list[int]], states_for: StatesFor, max_new_tokens: int, pad_token_id: int,
    eos_token_id: int | None,
) -> list[list[int]]:
    """Greedy continuation of each prompt, cut at EOS; fixed step count on every rank."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding: new tokens go on the right
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    # Augmenting models with a tokenizer of their own read the text of the tokens so far.
    aligner = getattr(getattr(engine, "module", engine), "aligner", None)
    for _ in range(max_new_tokens):
        batch = {"input_ids": ids, "attention_mask": mask}
        if aligner is not None:
            batch = aligner.extend_batch(batch)
        logits = engine(ids, mask, augmenting_states=states_for(batch),
                        augmenting_views=views_from_batch(batch)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return cut_at_eos(ids[:, width:].tolist(), eos_token_id)


@torch.no_grad()
def exact_match(
    engine, prompts: list[list[int]], targets: list[str], decode, states_for: StatesFor, micro_batch_size: int,
    max_new_tokens: int, pad_token_id: int, eos_token_id: int | None,
) -> float:
    """Share of prompts whose greedy completion, decoded and stripped, equals the target; over all ranks.
    Every rank must pass the same number of prompts."""
    hits = 0
    for start in range(0, len(prompts), micro_batch_size):
        chunk = prompts[start:start + micro_batch_size]
        completions = greedy_completions(engine, chunk, states_for, max_new_tokens, pad_token_id, eos_token_id)
        hits += sum(decode(c).strip() == t.strip() for c, t in zip(completions, targets[start:], strict=False))
    return global_sum(hits) / max(1.0, global_sum(len(prompts)))
