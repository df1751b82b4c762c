"""One process of bench/train_scaling.py, started by torchrun. Not meant to be run by hand.

    scaling_worker.py MODE FOLDER STEPS   (MODE: bytes, anchor_only, colocated, pipelined)
"""

import atexit
import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from calm_dist.distributed.engine import build_engine, deepspeed_config
from calm_dist.distributed.partitioned_loading import load_partitioned, local_parameter_bytes
from calm_dist.distributed.placement import AugmentingClient, AugmentingServer, Layout, split_world
from calm_dist.model.architectures import dims_from_config
from calm_dist.model.composed import ComposedModel, augmenting_states
from calm_dist.model.connections import every_n

mode, folder, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)  # one core per process: the augmenting rank gets a core of its own
dist.init_process_group("gloo")
rank = dist.get_rank()


@atexit.register
def _shut_down_groups() -> None:
    # Before interpreter teardown: gloo groups left to it can abort the process at exit.
    if globals().get("world") is not None:
        world.close()
    if dist.is_initialized():
        dist.destroy_process_group()


anchor_config, aug_config = (AutoConfig.from_pretrained(folder / n) for n in ("anchor", "augmenting"))
connections = every_n(aug_config.num_hidden_layers, anchor_config.num_hidden_layers, 4)
batch = json.loads((folder / "batch.json").read_text())
ids = torch.randint(3, anchor_config.vocab_size, (batch["size"], batch["length"]),
                    generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)


def load_aug():
    return [AutoModelForCausalLM.from_pretrained(folder / "augmenting", dtype=torch.float32).eval()]


layout = Layout(1, 1) if mode == "pipelined" else None
world = split_world(layout, "gloo") if layout else None
if layout and not layout.is_anchor(rank):
    AugmentingServer(load_aug(), connections, layout, world.exchange, torch.device("cpu"), lambda: None).serve()
    sys.exit(0)

deepspeed.init_distributed("gloo")
size = dist.get_world_size()
ds_config = deepspeed_config(micro_batch_size=batch["size"], gradient_accumulation_steps=1, data_parallel_size=size)
anchor = load_partitioned(folder / "anchor", ds_config, torch.float32)
if mode == "bytes":
    total = sum(p.ds_numel * p.ds_tensor.element_size() for p in anchor.parameters())
    (folder / f"bytes-{size}-{rank}.json").write_text(json.dumps({"local": local_parameter_bytes(anchor), "total": total}))
    sys.exit(0)

composed = ComposedModel(anchor, [dims_from_config(aug_config)], connections)
engine, _, _ = build_engine(composed, ds_config, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                            schedule=lambda step: 1.0)
if mode == "pipelined":
    client = AugmentingClient(layout, world.exchange, connections, [aug_config.hidden_size], [torch.float32],
                              torch.device("cpu"), prefetch=2)
    stream = client.prefetched(iter(lambda: {"input_ids": ids, "attention_mask": mask}, None), lambda: {})
    states_for = client.states_for
else:
    stream = iter(lambda: {"input_ids": ids, "attention_mask": mask}, None)
    aug = load_aug()
    fixed = augmenting_states(aug, connections, ids, mask)

    def states_for(b):
        return fixed if mode == "anchor_only" else augmenting_states(aug, connections, b["input_ids"], b["attention_mask"])

times = []
for _ in range(steps):
    start = time.perf_counter()
    b = next(stream)
    loss = engine(b["input_ids"], b["attention_mask"], labels=b["input_ids"], augmenting_states=states_for(b)).loss
    engine.backward(loss)
    engine.step()
    times.append(time.perf_counter() - start)
if mode == "pipelined":
    client.stop()
(folder / f"times-{mode}.json").write_text(json.dumps(times))
