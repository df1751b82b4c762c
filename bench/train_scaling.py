"""Distributed training figures on CPU, printed as JSON.

1. Anchor bytes each rank holds with ZeRO-3 partitioned loading at 1 and 2 ranks (target: 1/N within 5%).
2. Step time of one training step (forward, backward, optimizer) at the same batch:
   - anchor_only: the composed anchor with augmenting states computed once beforehand (no augmenting work),
   - colocated: the same process also runs the augmenting forward,
   - pipelined: an augmenting rank on its own core computes the states, two micro-batches ahead.
   Target: pipelined <= 1.10 x anchor_only. Each process uses one thread, so the augmenting rank has a
   core of its own on a 2-core machine.

Each run (bench/scaling_worker.py under torchrun) builds what a `calm train` worker builds, through
calm_dist.distributed.trainer, from a training config written here: two tiny Llama models with the tiny
tokenizer beside them, and records that fill every micro-batch (--batch x --length tokens).

    .venv/bin/python bench/train_scaling.py [--anchor 8x512] [--augmenting 8x384] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def torchrun(ranks: int, mode: str, config: Path, port: int) -> list:
    """Each rank's result (scaling_worker.py's OUT.RANK.json); the augmenting rank of a pipelined run writes none."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    out = config.with_suffix("")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
         str(ROOT / "bench/scaling_worker.py"), mode, str(config), str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    if done.returncode:
        sys.exit(f"{mode} on {ranks} rank(s) failed:\n{done.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(ranks)
            if Path(f"{out}.{rank}.json").exists()]


def write_config(folder: Path, mode: str, anchor_ranks: int, args: argparse.Namespace) -> Path:
    """The training config of one run: its micro-batch is the bench's batch, one per anchor rank and step,
    with no gradient clipping and a constant learning rate; every step is logged (with its time)."""
    config = {
        "name": f"scaling-{mode}-{anchor_ranks}",
        "models": {"anchor": {"path": str(folder / "anchor"), "dtype": "float32"},
                   "augmenting": [{"path": str(folder / "augmenting"), "dtype": "float32"}]},
        "composition": {"every_n": 4},
        "data": {"train": str(folder / "train.jsonl"), "text_field": "text", "max_length": args.length},
        "training": {"steps": max(args.steps, 1), "micro_batch_size": args.batch,
                     "global_batch_size": args.batch * anchor_ranks, "log_every": 1,
                     "schedule": {"kind": "constant"}, "optimizer": {"grad_clip": None}},
        "placement": {"mode": "pipelined" if mode == "pipelined" else "colocated", "prefetch": 2},
        "ray": {"num_workers": anchor_ranks},
        "output_dir": str(folder / "runs"),
    }
    path = folder / f"{mode}-{anchor_ranks}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor", default="8x512", help="layers x width")
    parser.add_argument("--augmenting", default="8x384", help="layers x width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps; the first 2 are warm-up")
    args = parser.parse_args()

    from calm_dist.testing.tiny_models import tiny_model
    from calm_dist.testing.tokenizers import tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, spec, seed in (("anchor", args.anchor, 0), ("augmenting", args.augmenting, 1)):
            layers, width = map(int, spec.split("x"))
            tiny_model("llama", layers=layers, width=width, heads=width // 64, vocab=4096, seed=seed).save_pretrained(folder / name)
            tiny_tokenizer().save_pretrained(folder / name)
        # One token per character: each record fills a sequence of args.length tokens, so every
        # micro-batch is args.batch x args.length.
        rng = random.Random(0)
        (folder / "train.jsonl").write_text("".join(
            json.dumps({"text": "".join(rng.choices(string.ascii_lowercase + " ", k=args.length))}) + "\n"
            for _ in range(16 * args.batch)))

        result: dict = {"anchor": args.anchor, "augmenting": args.augmenting, "batch": [args.batch, args.length]}
        for ranks in (1, 2):
            reports = torchrun(ranks, "bytes", write_config(folder, "bytes", ranks, args), 29610 + ranks)
            fractions = [r["local"] / r["total"] for r in reports]
            result[f"anchor_bytes_per_rank_{ranks}_ranks"] = [r["local"] for r in reports]
            result[f"anchor_fraction_per_rank_{ranks}_ranks"] = [round(f, 4) for f in fractions]
            result[f"partition_target_met_{ranks}_ranks"] = all(abs(f * ranks - 1) <= 0.05 for f in fractions)
        result["anchor_total_bytes"] = reports[0]["total"]

        for port, (mode, ranks) in enumerate((("anchor_only", 1), ("colocated", 1), ("pipelined", 2))):
            (times,) = torchrun(ranks, mode, write_config(folder, mode, 1, args), 29620 + port)
            result[f"step_s_{mode}"] = round(statistics.median(times[2:]), 4)
        ratio = result["step_s_pipelined"] / result["step_s_anchor_only"]
        result["pipelined_over_anchor_only"] = round(ratio, 4)
        result["colocated_over_anchor_only"] = round(result["step_s_colocated"] / result["step_s_anchor_only"], 4)
        result["target_pipelined_ratio"] = 1.10
        result["pipelined_target_met"] = ratio <= 1.10
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
