"""Run under torchrun with 2 processes: `calm train`'s Trainer on a tiny config, 2 steps each, under every
DeepSpeed setting a config may choose: ZeRO-3 without offload, with the optimizer offloaded to the CPU,
with the parameters too (as `calm plan` may suggest), and ZeRO stages 2 and 0 (the anchor held whole).

usage: zero_settings_check.py CONFIG.yaml OUT   (writes OUT.RANK: the losses each run logged)
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from calm_dist.distributed.trainer import Trainer
from launcher.train_config import load_config

config_path, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
losses = {}
for name, overrides in (("none", {}), ("optimizer", {"deepspeed.offload_optimizer": True}),
                        ("parameters", {"deepspeed.offload_optimizer": True, "deepspeed.offload_params": True}),
                        ("stage 2", {"deepspeed.zero_stage": 2}), ("stage 0", {"deepspeed.zero_stage": 0})):
    config = load_config(config_path, {**overrides, "training.steps": 2, "training.checkpoint_every": None})
    trainer = Trainer(config, torch.device("cpu"), rank)
    losses[name] = []
    trainer.fit(report=lambda step, directory: None,
                on_log=lambda step, metrics, run=name: losses[run].append(metrics["loss"]))
with open(f"{out}.{rank}", "w") as f:
    json.dump(losses, f)
dist.destroy_process_group()
