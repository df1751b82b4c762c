"""Distributed training figures on CPU, printed as JSON.

1. Anchor bytes each rank holds with ZeRO-3 partitioned loading at 1 and 2 ranks (target: 1/N within 5%).
2. Step time of one training step (forward, backward, optimizer) at the same batch:
   - anchor_only: the composed anchor with augmenting states computed once beforehand (no augmenting work),
   - colocated: the same process also runs the augmenting forward,
   - pipelined: an augmenting rank on its own core computes the states, two micro-batches ahead.
   Target: pipelined <= 1.10 x anchor_only. Each process uses one thread, so the augmenting rank has a
   core of its own on a 2-core machine.

    .venv/bin/python bench/train_scaling.py [--anchor 8x512] [--augmenting 8x384] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(ranks: int, mode: str, folder: Path, steps: int, port: int) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
         str(ROOT / "bench/scaling_worker.py"), mode, str(folder), str(steps)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    if done.returncode:
        sys.exit(f"{mode} on {ranks} rank(s) failed:\n{done.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor", default="8x512", help="layers x width")
    parser.add_argument("--augmenting", default="8x384", help="layers x width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps; the first 2 are warm-up")
    args = parser.parse_args()

    from calm_dist.testing.tiny_models import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, spec, seed in (("anchor", args.anchor, 0), ("augmenting", args.augmenting, 1)):
            layers, width = map(int, spec.split("x"))
            tiny_model("llama", layers=layers, width=width, heads=width // 64, vocab=4096, seed=seed).save_pretrained(folder / name)
        (folder / "batch.json").write_text(json.dumps({"size": args.batch, "length": args.length}))

        result: dict = {"anchor": args.anchor, "augmenting": args.augmenting, "batch": [args.batch, args.length]}
        for ranks in (1, 2):
            torchrun(ranks, "bytes", folder, 0, 29610 + ranks)
            reports = [json.loads((folder / f"bytes-{ranks}-{r}.json").read_text()) for r in range(ranks)]
            fractions = [r["local"] / r["total"] for r in reports]
            result[f"anchor_bytes_per_rank_{ranks}_ranks"] = [r["local"] for r in reports]
            result[f"anchor_fraction_per_rank_{ranks}_ranks"] = [round(f, 4) for f in fractions]
            result[f"partition_target_met_{ranks}_ranks"] = all(abs(f * ranks - 1) <= 0.05 for f in fractions)
        result["anchor_total_bytes"] = reports[0]["total"]

        for port, (mode, ranks) in enumerate((("anchor_only", 1), ("colocated", 1), ("pipelined", 2))):
            torchrun(ranks, mode, folder, args.steps, 29620 + port)
            times = json.loads((folder / f"times-{mode}.json").read_text())[2:]
            result[f"step_s_{mode}"] = round(statistics.median(times), 4)
        ratio = result["step_s_pipelined"] / result["step_s_anchor_only"]
        result["pipelined_over_anchor_only"] = round(ratio, 4)
        result["colocated_over_anchor_only"] = round(result["step_s_colocated"] / result["step_s_anchor_only"], 4)
        result["target_pipelined_ratio"] = 1.10
        result["pipelined_target_met"] = ratio <= 1.10
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
