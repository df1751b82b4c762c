"""One process of bench/plan_accuracy.py, started by torchrun. Not meant to be run by hand.

    plan_worker.py CASE.json   (CASE: {"config": a training config, "out": where to write})

Runs what a `calm train` worker runs (launcher/train/worker.py without Ray): an anchor rank trains
with calm_dist.distributed.trainer's Trainer (partitioned anchor, composed model, DeepSpeed engine, the
training loop and its final checkpoint), and in pipelined mode an augmenting rank serves states
(serve_augmenting). Writes this process's resident memory to OUT.RANK: the baseline before any model
tensor exists, the peak sampled every millisecond while the models load and train, and marks after
each step and after the checkpoint.
"""

import json
import sys
import threading
import time
from pathlib import Path

import torch
from rank_setup import start_rank

from calm_dist.data.records import load_records
from calm_dist.distributed.base_models import load_tokenizer
from calm_dist.distributed.engine import init_process_group
from calm_dist.distributed.trainer import Trainer, connections_of, serve_augmenting
from launcher.train_config import TrainConfig


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
config = TrainConfig.model_validate(case["config"])
rank, layout, world = start_rank(config)
device = torch.device("cpu")
is_anchor = layout is None or layout.is_anchor(rank)
# The runtime goes into the baseline: what transformers imports to read the models' configs, and on an
# anchor rank DeepSpeed's setup and the data pipeline's imports (the tokenizer and records read once and
# dropped; the Trainer reads them again). No model tensor exists yet.
connections_of(config)
if is_anchor:
    init_process_group(config.ray.use_gpu)
    load_tokenizer(config.models.tokenizer or config.models.anchor.path)
    load_records(config.data.train, config.data.split)
baseline_anon, baseline = resident()
marks: dict[str, int] = {}


sampler = PeakSampler()
sampler.start()
if is_anchor:
    trainer = Trainer(config, device, rank, layout=layout, exchange=world.exchange if world else None)
    # training.log_every is 1 (plan_accuracy.py), so on_log runs after every step.
    trainer.fit(report=lambda step, directory: marks.__setitem__("checkpoint_saved", rss() - baseline),
                on_log=lambda step, metrics: marks.__setitem__(f"after_step_{step}", rss() - baseline))
else:
    serve_augmenting(config, layout, world.exchange, device, on_barrier=lambda: None)
peak_anon, peak = sampler.stop()
Path(f"{case['out']}.{rank}").write_text(json.dumps({
    "role": "anchor" if is_anchor else "augmenting",
    "baseline_bytes": baseline, "peak_bytes": peak, "measured_bytes": peak - baseline, "marks": marks,
    "anonymous_bytes": peak_anon - baseline_anon,
}))
