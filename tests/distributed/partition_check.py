"""Run under torchrun with 2 processes: each rank loads every given checkpoint partitioned, one after
the other, and reports what it holds and whether the gathered parameters equal the files bitwise.

usage: partition_check.py OUT CHECKPOINT...   (writes OUT.RANK, a JSON list with one report per checkpoint)
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from calm_dist.distributed.partitioned_loading import load_partitioned, local_parameter_bytes
from calm_dist.distributed.weight_names import checkpoint_files, plan_weights

out, paths = sys.argv[1], sys.argv[2:]
deepspeed.init_distributed(dist_backend="gloo")
reports = []
for path in paths:
    model = load_partitioned(path, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}},
                             torch.float32)
    files = checkpoint_files(path)
    with torch.device("meta"):
        plan = plan_weights(AutoModelForCausalLM.from_config(model.config), files, path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    equal_file = equal_reference = True
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]), safe_open(files[plan.sources[name]], "pt") as f:
            equal_file &= torch.equal(param.data, f.get_tensor(plan.sources[name]))
            equal_reference &= torch.equal(param.data, reference.get_parameter(name).data)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    reports.append({
        "path": path,
        "local_bytes": local_parameter_bytes(model),
        "total_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
        "equal_file": bool(equal_file),
        "equal_reference": bool(equal_reference),
        "parameters": sorted(name for name, _ in model.named_parameters()),
        "reference_parameters": sorted(name for name, _ in reference.named_parameters()),
        "head_is_embedding": head is embedding,
    })
    del model
with open(f"{out}.{dist.get_rank()}", "w") as f:
    json.dump(reports, f)
# Join gloo's threads before the interpreter tears down: a process group left to static destructors can
# abort the process at exit ("terminate called without an active exception").
dist.destroy_process_group()
