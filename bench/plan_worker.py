"""One process of bench/plan_accuracy.py, started by torchrun. Not meant to be run by hand.

    plan_worker.py CASE.json

Runs what a `calm train` worker runs (partitioned anchor, composed model, DeepSpeed engine, the
training loop of calm_dist.distributed.train_loop; in pipelined mode an augmenting rank serving states) and
writes this process's resident memory: the baseline before any model tensor exists, and the peak
sampled every millisecond while the models load and train.
"""

import json
import sys
import threading
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from calm_dist.distributed.engine import build_engine, deepspeed_config
from calm_dist.distributed.partitioned_loading import load_partitioned
from calm_dist.distributed.placement import AugmentingClient, AugmentingServer, Layout, split_world
from calm_dist.distributed.train_loop import LoopSettings, run
from calm_dist.model.architectures import dims_from_config
from calm_dist.model.composed import ComposedModel, augmenting_states
from calm_dist.model.connections import every_n


def resident() -> tuple[int, int]:
    """(RssAnon, VmRSS) of this process: anonymous memory, and all resident pages including file-backed
    ones (weights that transformers maps straight from their safetensors file)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def rss() -> int:
    return resident()[1]


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.anon, self.total = resident()
        self.running = True

    def sample(self) -> None:
        anon, total = resident()
        self.anon, self.total = max(self.anon, anon), max(self.total, total)

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(0.001)

    def stop(self) -> tuple[int, int]:
        self.running = False
        self.join()
        self.sample()
        return self.anon, self.total


case = json.loads(Path(sys.argv[1]).read_text())
torch.set_num_threads(1)
torch.manual_seed(0)
dist.init_process_group("gloo")
rank = dist.get_rank()
folder = Path(case["folder"])
anchor_config, aug_config = (AutoConfig.from_pretrained(folder / n) for n in ("anchor", "augmenting"))
connections = every_n(aug_config.num_hidden_layers, anchor_config.num_hidden_layers, case["every_n"])
pipelined = case["mode"] == "pipelined"
layout = Layout(case["anchor_workers"], 1) if pipelined else None
world = split_world(layout, "gloo") if pipelined else None
batch, length = case["micro_batch"], case["length"]
generator = torch.Generator().manual_seed(rank)


def batches():
    while True:
        ids = torch.randint(3, anchor_config.vocab_size, (batch, length), generator=generator)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def load_aug():
    return [AutoModelForCausalLM.from_pretrained(folder / "augmenting", dtype=torch.float32).requires_grad_(False).eval()]


if not (pipelined and not layout.is_anchor(rank)):
    deepspeed.init_distributed("gloo")
baseline_anon, baseline = resident()
marks = {}
sampler = PeakSampler()
sampler.start()
if pipelined and not layout.is_anchor(rank):
    AugmentingServer(load_aug(), connections, layout, world.exchange, torch.device("cpu"), lambda: None).serve()
else:
    workers = case["anchor_workers"]
    ds_config = deepspeed_config(micro_batch_size=batch, gradient_accumulation_steps=1, data_parallel_size=workers)
    anchor = load_partitioned(folder / "anchor", ds_config, torch.float32)
    marks["anchor_loaded"] = rss() - baseline
    if case["activation_checkpointing"]:
        anchor.activation_checkpointing_enable({"use_reentrant": False})
    composed = ComposedModel(anchor, [dims_from_config(aug_config)], connections)
    engine, _, _ = build_engine(composed, ds_config, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                                schedule=lambda step: 1.0)
    marks["engine_built"] = rss() - baseline
    stream = batches()
    if pipelined:
        client = AugmentingClient(layout, world.exchange, connections, [aug_config.hidden_size], [torch.float32],
                                  torch.device("cpu"), prefetch=case["prefetch"])
        stream = client.prefetched(stream, lambda: {})
        states_for = client.states_for
    else:
        augmenting = load_aug()

        def states_for(b):
            return augmenting_states(augmenting, connections, b["input_ids"], b["attention_mask"])

    settings = LoopSettings(1, 1, 10**6, None, None)
    for step in range(case["steps"]):
        run(engine, stream, states_for, settings, 0, lambda step, metrics: None, lambda step: None)
        marks[f"after_step_{step + 1}"] = rss() - baseline
    if pipelined:
        client.stop()
peak_anon, peak = sampler.stop()
Path(f"{case['out']}.{rank}").write_text(json.dumps({
    "role": "anchor" if not pipelined or layout.is_anchor(rank) else "augmenting",
    "baseline_bytes": baseline, "peak_bytes": peak, "measured_bytes": peak - baseline, "marks": marks,
    "anonymous_bytes": peak_anon - baseline_anon,
}))
