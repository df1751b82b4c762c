"""Run under torchrun with 2 processes: each rank loads the anchor partitioned and reports what it holds."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from calm_dist.partitioned_loading import load_partitioned, local_parameter_bytes

path, out = sys.argv[1], sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
model = load_partitioned(path, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}, torch.float32)
reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
equal = True
for (_, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
    with deepspeed.zero.GatheredParameters([param]):
        equal &= torch.equal(param.data, expected.data)
total = sum(p.numel() * p.element_size() for p in reference.parameters())
with open(f"{out}.{dist.get_rank()}", "w") as f:
    json.dump({"local_bytes": local_parameter_bytes(model), "total_bytes": total, "equal": bool(equal)}, f)
