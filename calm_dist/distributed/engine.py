"""The DeepSpeed engine around a composed model: ZeRO config, optimizer over the composition only,
learning-rate schedule. The composed model itself never learns it is wrapped."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import deepspeed
import torch

from calm_dist.model.composed import ComposedModel

# DeepSpeed 0.19 calls torch.distributed's all_gather_into_tensor and reduce_scatter_tensor, which torch
# 2.13 deprecates with a FutureWarning at each call: a line a step in every worker's output (--verbose),
# about code that is not ours.
warnings.filterwarnings(
    "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning)


def deepspeed_config(
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    data_parallel_size: int,
    zero_stage: int = 3,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    grad_clip: float | None = None,
    extra: dict | None = None,
) -> dict:
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3 and data_parallel_size == 1 and not offload_params:
        # One rank's partition is the whole model: gathering and releasing each module around its use
        # frees nothing and cost 7 % of a step (SmolLM2 on a 2-core CPU worker: 2.1 against 2.25 s/step,
        # the same losses bit for bit). Every parameter persists instead.
        zero["stage3_param_persistence_threshold"] = 2**62
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params and zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * data_parallel_size,
        "zero_optimization": zero,
        # Our own torch optimizer over the composition only: no JIT-built DeepSpeed op, and frozen
        # parameters get no optimizer state.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        # DeepSpeed refuses a torch optimizer with offload unless told otherwise (its CPU Adam would be a
        # JIT-built op). The composition is ~1-2% of the anchor, so torch's AdamW on the CPU keeps up.
        config["zero_force_ds_cpu_optimizer"] = False
    if grad_clip:
        config["gradient_clipping"] = grad_clip
    return {**config, **(extra or {})}


def lr_lambda(kind: str, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * shape

    return factor


def build_engine(
    model: ComposedModel,
    ds_config: dict,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    schedule: Callable[[int], float],
):
    """(engine, optimizer, scheduler); the optimizer sees only the composition parameters."""
    optimizer = torch.optim.AdamW(
        model.composition_parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def init_process_group(use_gpu: bool) -> None:
    """DeepSpeed's view of the process group the launcher set up (Ray Train or torchrun): NCCL for GPU
    workers, gloo for CPU ones."""
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def inference_engine(model: torch.nn.Module, ds_config: dict):
    """A ZeRO engine around a frozen model (or a composition being scored), in eval mode."""
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine
