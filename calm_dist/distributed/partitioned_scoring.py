"""Score a frozen model that no single worker holds: ZeRO-3 partitions over a process group, each
layer gathered only while it runs.

The merge job's weights from examples use this for candidates too large for one machine: every rank
of the group loads its 1/N slice with calm_dist.distributed.partitioned_loading, DeepSpeed's ZeRO-3 inference
hooks gather each module's weights for its forward and free them after, and every rank runs the same
scoring function on the same examples (ZeRO-3 needs every rank to run the same modules).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from calm_dist.distributed.rendezvous import join_process_group


@dataclass(frozen=True)
class Scored:
    loss: float
    held_bytes: int  # parameter bytes this rank held (its partitions)
    total_bytes: int  # the whole model's parameter bytes


def join_group(master_addr: str, master_port: int, rank: int, world_size: int, use_gpu: bool) -> None:
    """Join the scoring workers' process group: NCCL on the one GPU this worker was given (its launcher,
    Ray, makes it the only visible one, so it is cuda:0 here), or gloo on the CPU with every GPU hidden
    (a worker that asked for no GPU still sees them all, and would pile onto cuda:0)."""
    if use_gpu:
        torch.cuda.set_device(0)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["LOCAL_RANK"] = "0"
    join_process_group("nccl" if use_gpu else "gloo", master_addr, master_port, rank, world_size,
                       timeout=timedelta(minutes=30))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # DeepSpeed's view of the group


def zero3_inference_config() -> dict:
    # No tensor persists whole on every rank (threshold 0), so each rank holds exactly its 1/N.
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "steps_per_print": 10**9}


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype the checkpoint's config declares (what a single-process `dtype="auto"` load gives)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, declared) if isinstance(declared, str) else declared


def score_partitioned(path: str, kind: str, score: Callable[[nn.Module], float]) -> Scored:
    """Load the model at `path` partitioned over the group, run `score(model)` on every rank."""
    import deepspeed

    # zero.Init patches torch's tensor constructors, and torch._dynamo refuses to import while they are
    # patched; transformers imports a model family's module (Bert's imports torch._dynamo) when
    # from_config first meets it, which happens inside zero.Init. Import it before.
    import torch._dynamo  # noqa: F401
    from transformers import AutoModel, AutoModelForCausalLM

    from calm_dist.distributed.partitioned_loading import load_partitioned, local_parameter_bytes

    ds_config = zero3_inference_config()
    model = load_partitioned(path, ds_config, checkpoint_dtype(path),
                             auto_class=AutoModelForCausalLM if kind == "decoder" else AutoModel)
    held = local_parameter_bytes(model)
    total = sum(p.ds_numel * p.ds_tensor.element_size() for p in model.parameters())
    # No optimizer: DeepSpeed sets up ZeRO-3 inference, whose module hooks gather and release weights.
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    try:
        with torch.no_grad():
            loss = score(engine.module)
    finally:
        engine.destroy()
        del engine, model
        gc.collect()
    return Scored(loss, held, total)
