"""One readable training loop, run by every anchor worker in lockstep.

It knows the DeepSpeed engine's three calls (forward, backward, step) and nothing of Ray: logging,
checkpoint reporting and evaluation come in as callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from calm_dist.distributed.collectives import all_sum, global_mean
from calm_dist.model.alignment import views_from_batch

StatesFor = Callable[[dict[str, torch.Tensor]], dict]


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    gradient_accumulation_steps: int
    log_every: int
    eval_every: int | None
    checkpoint_every: int | None
    keep_anchor_weight: float = 1.0


def run(
    engine,
    batches: Iterator[dict[str, torch.Tensor]],
    states_for: StatesFor,
    settings: LoopSettings,
    start_step: int,
    on_log: Callable[[int, dict], None],
    on_checkpoint: Callable[[int], None],
    evaluate: Callable[[], dict] | None = None,
    on_step: Callable[[int], None] = lambda step: None,
) -> dict:
    """Train from start_step to settings.steps; returns the last logged metrics. on_step is told of
    every step (a progress bar), on_log of every logged one."""
    engine.train()
    metrics: dict = {}
    window_losses: list[float] = []
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start_step + 1, settings.steps + 1):
        step_start = time.perf_counter()
        for _ in range(settings.gradient_accumulation_steps):
            batch = next(batches)
            states = states_for(batch)
            # Hooks stay on through backward: activation checkpointing re-runs anchor layers there (with
            # their module hooks, in transformers versions that checkpoint __call__ rather than forward).
            with engine.module.attached():
                loss = engine(
                    batch["input_ids"], batch["attention_mask"], labels=batch["labels"], augmenting_states=states,
                    augmenting_views=views_from_batch(batch), keep_anchor=batch.get("keep_anchor"),
                    keep_anchor_weight=settings.keep_anchor_weight,
                ).loss
                engine.backward(loss)
            engine.step()  # DeepSpeed applies the update only at the accumulation boundary
            window_losses.append(loss.item())
            window_tokens += int(batch["attention_mask"].sum())
        step_time = time.perf_counter() - step_start
        on_step(step)

        if step % settings.log_every == 0 or step == settings.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "step": step,
                "loss": global_mean(window_losses),
                "lr": engine.get_lr()[0],
                "tokens_per_s": all_sum([window_tokens])[0] / elapsed,
                "step_time_s": step_time,
            }
            window_losses, window_tokens, window_start = [], 0, time.perf_counter()
            if evaluate is not None and settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps):
                metrics.update(evaluate())
                engine.train()
            on_log(step, metrics)
        if step == settings.steps or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
            on_checkpoint(step)
    return metrics
