"""A plain single-process training loop, for what is small enough not to need Ray or DeepSpeed: the
demo's base models (they stand for the "given" pretrained models) and the LoRA baseline."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from calm_dist.data.batches import ShardedBatches

Batch = dict[str, torch.Tensor]


def lm_loss(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    """Next-token loss of a Hugging Face causal LM on a collated batch (labels -100 are skipped)."""

    def loss(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    return loss


def batches(rows, micro_batch_size: int, seed: int, pad_token_id: int) -> Iterator[Batch]:
    """Endless shuffled batches of tokenized rows (input_ids, labels), as one data-parallel rank sees them."""
    return iter(ShardedBatches(rows, micro_batch_size=micro_batch_size, rank=0, world_size=1, seed=seed,
                               pad_token_id=pad_token_id))


def train(
    loss_of: Callable[[Batch], torch.Tensor],
    parameters: Iterable[nn.Parameter],
    stream: Iterator[Batch],
    steps: int,
    lr: float,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """AdamW with linear warm-up then cosine decay to zero; returns the mean loss of the last 10% of steps."""
    parameters = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    tail: list[float] = []
    for step in range(steps):
        loss = loss_of(next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        schedule.step()
        value = loss.item()
        if step >= steps - max(1, steps // 10):
            tail.append(value)
        if on_step is not None:
            on_step(step + 1, value)
    return sum(tail) / len(tail)
