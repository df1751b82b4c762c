"""The single changes to a run's config that would make it fit a device, each with the plan's new peak
(`calm plan` prints them when a worker's total exceeds the device's memory)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from calm_dist.distributed.memory_plan import TrainSetup, peak


@dataclass(frozen=True)
class Suggestion:
    change: str  # what to set, in config keys
    total: int  # the new largest per-worker total
    fits: bool


def fit_suggestions(setup: TrainSetup, device_memory: int, max_workers: int | None = None) -> list[Suggestion]:
    """Each single change that lowers the peak, with its new total; then all of them together. More
    workers are tried up to `max_workers` (default 8x the config's)."""
    found: list[Suggestion] = []
    max_workers = max_workers or 8 * setup.anchor_workers

    def add(change: str, changed: TrainSetup) -> None:
        total = peak(changed)
        if total < peak(setup):
            found.append(Suggestion(change, total, total <= device_memory))

    n = setup.anchor_workers
    more = next((m for m in _worker_counts(n, max_workers) if peak(_workers(setup, m)) <= device_memory), None)
    if more is not None:
        add(f"ray.num_workers: {more} (training.global_batch_size a multiple of "
            f"{setup.micro_batch * more})", _workers(setup, more))
    elif n < max_workers:
        add(f"ray.num_workers: {max_workers} (still does not fit)", _workers(setup, max_workers))
    if not setup.activation_checkpointing:
        add("deepspeed.activation_checkpointing: true", replace(setup, activation_checkpointing=True))
    if not setup.pipelined:
        groups = max(1, n // 8)
        add(f"placement.mode: pipelined, placement.augmenting_workers: {groups}",
            replace(setup, pipelined=True, augmenting_workers=groups))
    if setup.micro_batch > 1:
        smaller = setup.micro_batch // 2
        while smaller > 1 and peak(replace(setup, micro_batch=smaller)) > device_memory:
            smaller //= 2
        add(f"training.micro_batch_size: {smaller} (gradient accumulation "
            f"{setup.accumulation} -> {setup.global_batch // (smaller * n)})", replace(setup, micro_batch=smaller))
    if not setup.offload_optimizer:
        add("deepspeed.offload_optimizer: true", replace(setup, offload_optimizer=True))
    if not setup.offload_params and setup.zero_stage == 3:
        add("deepspeed.offload_params: true", replace(setup, offload_params=True))
    together = replace(setup, activation_checkpointing=True, offload_optimizer=True,
                       pipelined=True, augmenting_workers=max(1, setup.augmenting_workers if setup.pipelined else n // 8),
                       micro_batch=1)
    if len(found) > 1:
        add("all of the above except more workers", together)
    return found


def _worker_counts(n: int, limit: int) -> list[int]:
    counts, m = [], n
    while m < limit:
        m = m * 2 if m < 8 else m + 8
        counts.append(min(m, limit))
    return counts


def _workers(setup: TrainSetup, count: int) -> TrainSetup:
    return replace(setup, anchor_workers=count, global_batch=max(setup.global_batch, setup.micro_batch * count))

