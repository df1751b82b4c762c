"""LM-Cocktail's headline on SmolLM2-135M-Instruct, measured end to end (issue #22): full fine-tunes,
`calm merge` with weights from 10 examples, every model scored. Prints one JSON object.

Targets, per seed: finetuned_news >= base_news + 0.40; general_loss_increase >= 0.05; cocktail_news >=
finetuned_news - 0.03; general_loss_recovered >= 0.60 and general_exact_match_recovered >= 0.60;
mix_mixed >= the best of base, news and reviews fine-tunes alone on the mixed task; wall_s <= 2100 from
nothing (fine-tunes cached: <= 300); peak_rss_gib <= 6.

    .venv/bin/python bench/cocktail.py --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=None,
                        help="work folder, fine-tunes cached there (default: a new temporary folder, removed at the end)")
    args = parser.parse_args()

    from launcher.lm_cocktail.experiment import TARGETS, run_experiment

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="calm-cocktail-bench-"))
    sys.stdout = sys.stderr  # progress to stderr: stdout carries only the JSON
    try:
        results = run_experiment(root.resolve(), args.seed, print)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    results["load_average"] = os.getloadavg()[0]
    targets = {**TARGETS, "peak_rss_gib <= 6": lambda r: r["peak_rss_gib"] <= 6}
    results["targets_met"] = {name: bool(check(results)) for name, check in targets.items()}
    sys.__stdout__.write(json.dumps(results) + "\n")
    sys.__stdout__.flush()


if __name__ == "__main__":
    main()
