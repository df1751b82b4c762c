"""The small collectives of training and evaluation (metric sums, "has every rank finished?"), with
their tensors on the device the default process group takes: CUDA under NCCL, the CPU under gloo.
Outside torch.distributed (one process) they are the identity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _running() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_device() -> torch.device:
    """Where tensors handed to the default group's collectives must live."""
    if _running() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """Each value summed over every rank (float64)."""
    total = torch.tensor(list(values), dtype=torch.float64, device=group_device())
    if _running():
        dist.all_reduce(total)
    return total.tolist()


def everyone(flag: bool) -> bool:
    """True when the flag holds on every rank."""
    return all_sum([0.0 if flag else 1.0])[0] == 0


def global_mean(values: Sequence[float]) -> float:
    """Mean over this rank's values and every other rank's, each value weighted equally."""
    total, count = all_sum([sum(values), len(values)])
    return total / count
