"""`calm demo`: the main job on this machine with no downloads.

Reproduces the CALM paper's key-value arithmetic result (Table 1) with tiny models: data and the two
base models are made under runs/kv-arithmetic (cached, so a rerun skips them), the composition is trained
by `calm train` (two DeepSpeed ZeRO-3 workers on an embedded local Ray cluster) and evaluated, beside each
model alone and LoRA on the anchor. See launcher/kv_experiment.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launcher.config import ConfigError

USER_ERRORS = (ConfigError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from launcher.kv_experiment import CONFIG, ROOT

    parser.add_argument("--seed", type=int, default=0, help="changes keys, values and every initialisation")
    parser.add_argument("--config", default=str(CONFIG), help="the composition's training config")
    parser.add_argument("--root", default=str(ROOT), help="where data, models, runs and results go")
    parser.add_argument("--retrain", action="store_true",
                        help="train the composition again even if this seed's run has finished")


def run(args: argparse.Namespace) -> int:
    from launcher.kv_experiment import run_experiment
    from launcher.kv_report import text_table, write_report

    root = Path(args.root).resolve()
    results = run_experiment(root, args.seed, print, Path(args.config), retrain=args.retrain)
    paths = write_report(results, root / f"seed-{args.seed}" / "results")
    print()
    print(text_table(results))
    print(f"\nexact match in %; composition {results['composition_parameters']:,} trainable parameters, "
          f"LoRA {results['lora_parameters']:,}; {results['wall_s']:.0f} s")
    print(f"results: {paths['markdown']}  {paths['json']}  {paths['chart']}")
    return 0
