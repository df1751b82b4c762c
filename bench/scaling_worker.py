"""One process of bench/train_scaling.py, started by torchrun. Not meant to be run by hand.

    scaling_worker.py MODE CONFIG OUT   (MODE: bytes, anchor_only, colocated, pipelined)

Builds what a `calm train` worker builds, from the training config CONFIG (YAML), through
calm_dist.distributed.trainer: an anchor rank's Trainer, or in pipelined mode an augmenting rank's
serve_augmenting. Writes OUT.RANK.json:
- bytes: the anchor's bytes this rank holds with ZeRO-3 partitioned loading, and the anchor's total;
- anchor_only: the time of each training step with augmenting states computed once beforehand;
- colocated, pipelined: the time of each step of Trainer.fit, as the training loop logs it.
"""

import json
import sys
import time
from pathlib import Path

import torch
from rank_setup import start_rank

from calm_dist.distributed.partitioned_loading import local_parameter_bytes
from calm_dist.distributed.trainer import Trainer, serve_augmenting
from launcher.train_config import load_config

mode, config, out = sys.argv[1], load_config(sys.argv[2]), sys.argv[3]
rank, layout, world = start_rank(config)
device = torch.device("cpu")


def anchor_only_times(trainer: Trainer, steps: int) -> list[float]:
    """Steps as calm_dist.distributed.train_loop takes them, with the states of the first batch for every
    batch: the anchor's share of a step, without any augmenting forward."""
    engine, batches = trainer.engine, iter(trainer.batches)
    fixed = trainer.augmenting.states_for(next(batches))
    engine.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        with engine.module.attached():
            loss = engine(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                          augmenting_states=fixed).loss
            engine.backward(loss)
        engine.step()
        loss.item()
        times.append(time.perf_counter() - start)
    return times


if layout is not None and not layout.is_anchor(rank):
    serve_augmenting(config, layout, world.exchange, device, on_barrier=lambda: None)
    sys.exit(0)

trainer = Trainer(config, device, rank, layout=layout, exchange=world.exchange if world else None)
if mode == "bytes":
    anchor = trainer.model.anchor
    total = sum(p.ds_numel * p.ds_tensor.element_size() for p in anchor.parameters())
    result = {"local": local_parameter_bytes(anchor), "total": total}
elif mode == "anchor_only":
    result = anchor_only_times(trainer, config.training.steps)
else:
    # training.log_every is 1 (train_scaling.py), so every step is logged with its time.
    result = []
    trainer.fit(report=lambda step, directory: None, on_log=lambda step, metrics: result.append(metrics["step_time_s"]))
Path(f"{out}.{rank}.json").write_text(json.dumps(result))
