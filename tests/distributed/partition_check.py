"""Run under torchrun with 2 processes: each rank loads every given checkpoint partitioned, one after
the other, and reports what it holds, whether the gathered parameters equal the files bitwise, and how
far the partitioned model's logits are from `from_pretrained`'s in the same dtype.

usage: partition_check.py OUT DTYPE:CHECKPOINT...   (writes OUT.RANK, a JSON list with one report each)
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from calm_dist.distributed.engine import deepspeed_config, inference_engine, init_process_group
from calm_dist.distributed.partitioned_loading import load_partitioned, local_parameter_bytes
from calm_dist.distributed.weight_names import checkpoint_files, plan_weights

out, specs = sys.argv[1], sys.argv[2:]
init_process_group(use_gpu=False)
ds_config = deepspeed_config(micro_batch_size=1, gradient_accumulation_steps=1, data_parallel_size=2)
reports = []
for spec in specs:
    dtype_name, path = spec.split(":", 1)
    dtype = getattr(torch, dtype_name)
    model = load_partitioned(path, ds_config, dtype)
    files = checkpoint_files(path)
    with torch.device("meta"):
        plan = plan_weights(AutoModelForCausalLM.from_config(model.config), files, path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    equal_file = equal_reference = True
    engine = inference_engine(model, ds_config)
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]), safe_open(files[plan.sources[name]], "pt") as f:
            equal_file &= torch.equal(param.data, f.get_tensor(plan.sources[name]).to(dtype))
            equal_reference &= torch.equal(param.data, reference.get_parameter(name).data)
    if (Path(path) / "tokenizer.json").is_file():
        ids = AutoTokenizer.from_pretrained(path)("The capital of France is Paris, and the capital of Germany is",
                                                  return_tensors="pt").input_ids
    else:  # the tiny checkpoints have no tokenizer
        ids = torch.arange(3, 15)[None] % model.config.vocab_size
    with torch.no_grad():
        difference = (engine(input_ids=ids).logits.float() - reference(input_ids=ids).logits.float()).abs().max()
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    reports.append({
        "path": path,
        "dtype": dtype_name,
        "local_bytes": local_parameter_bytes(model),
        "total_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
        "equal_file": bool(equal_file),
        "equal_reference": bool(equal_reference),
        "max_logit_difference": difference.item(),
        "buffers": {name: str(b.dtype) for name, b in model.named_buffers()},
        "reference_buffers": {name: str(b.dtype) for name, b in reference.named_buffers()},
        "parameters": sorted(name for name, _ in model.named_parameters()),
        "reference_parameters": sorted(name for name, _ in reference.named_parameters()),
        "head_is_embedding": head is embedding,
    })
    del model, engine
with open(f"{out}.{dist.get_rank()}", "w") as f:
    json.dump(reports, f)
# Join gloo's threads before the interpreter tears down: a process group left to static destructors can
# abort the process at exit ("terminate called without an active exception").
dist.destroy_process_group()
