"""Training checkpoints: composition parameters, optimizer, schedule, RNG and data position, through
DeepSpeed's sharded format, never the frozen models. Plus export of the finished composition."""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from calm_dist.distributed.checkpoint_layout import STATE, write_rank_manifest
from calm_dist.model.composed import ComposedModel
from calm_dist.model.composition_checkpoint import save_composition


def save_training_state(engine, directory: str | Path, step: int, data_state: dict) -> Path:
    """Every rank writes its shard into `directory` (its own, until Ray Train merges them into one
    checkpoint folder), then a list of the files it wrote with their sizes; rank 0 also writes the step,
    data position and world size (calm_dist.distributed.checkpoint_layout says when such a folder is complete)."""
    directory = Path(directory)
    tag = f"step-{step:08d}"  # never 'latest', which is DeepSpeed's own pointer file
    engine.save_checkpoint(
        str(directory), tag=tag, exclude_frozen_parameters=True,
        client_state={"step": step, "data": data_state, "torch_rng": torch.get_rng_state()},
    )
    rank = dist.get_rank()
    if rank == 0:
        (directory / STATE).write_text(json.dumps({"step": step, "tag": tag, "data": data_state,
                                                   "world_size": dist.get_world_size()}))
    write_rank_manifest(directory, rank)
    return directory


def load_training_state(engine, directory: str | Path) -> tuple[int, dict]:
    """Restore the engine from `directory`; (step reached, data position)."""
    directory = Path(directory)
    state = json.loads((directory / STATE).read_text())
    _, client = engine.load_checkpoint(
        str(directory), tag=state["tag"], load_module_strict=False,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if client and "torch_rng" in client:
        torch.set_rng_state(client["torch_rng"])
    return state["step"], state["data"]


def export_composition(model: ComposedModel, path: str | Path, extra: dict | None = None,
                       augmenting_sources: list[str] | None = None) -> Path | None:
    """Write the composition checkpoint (calm_dist.model.composition_checkpoint format) from rank 0.
    Under ZeRO-3 each composition tensor is gathered one at a time, every rank taking part, and only rank
    0 keeps a copy, in host memory: a device never holds more than one gathered tensor for the export.
    augmenting_sources: the augmenting models' folders, which a model holding only their dimensions
    cannot name."""
    writer = dist.get_rank() == 0
    state = {}
    for name, param in model.composition.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if writer:
                state[name] = param.detach().to("cpu", copy=True)
    if not writer:
        return None
    for name, buffer in model.composition.named_buffers():
        state[name] = buffer.detach().clone()
    return save_composition(model, path, extra=extra, state=state, augmenting_sources=augmenting_sources)
