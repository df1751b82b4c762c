"""`calm demo`: the main job on this machine with no downloads.

By default it reproduces the CALM paper's key-value arithmetic result (Table 1) with tiny models: data
and the two base models are made under runs/kv-arithmetic (cached, so a rerun skips them), the
composition is trained by `calm train` (two DeepSpeed ZeRO-3 workers on an embedded local Ray cluster)
and evaluated, beside each model alone and LoRA on the anchor (launcher/kv_arithmetic/experiment.py).

`calm demo real` composes a real pretrained anchor, SmolLM2-135M-Instruct, with a specialist trained here
on a fictional world it knows and the anchor does not (launcher/real_anchor/experiment.py), under
runs/real-anchor.

`calm demo cocktail` is the merge side's: LM-Cocktail's result on the real SmolLM2-135M-Instruct
(launcher/lm_cocktail/experiment.py), fine-tunes cached under runs/lm-cocktail.

`--tiny` instead trains configs/tiny.yaml: two random tiny models on toy additions, the quickest run of
the whole training path (about a minute), whose assets the tests also use.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from calm_dist.errors import InputError
from launcher import REPO

USER_ERRORS = (InputError,)  # ConfigError, DataError, CompositionError: also those met on the workers
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults named, not imported: launcher.kv_arithmetic.experiment imports torch, and `calm --help` must not.
    parser.add_argument("experiment", nargs="?", choices=("kv-arithmetic", "real", "cocktail"),
                        default="kv-arithmetic",
                        help="CALM's key-value arithmetic (default), CALM on the real SmolLM2 anchor, or LM-Cocktail on it")
    parser.add_argument("--seed", type=int, default=0,
                        help="changes keys, values and every initialisation (cocktail: the data and fine-tuning order)")
    parser.add_argument("--config", default=None,
                        help=f"the composition's training config (default kv-arithmetic.yaml; with --tiny {TINY_CONFIG.name})")
    parser.add_argument("--root", default=None,
                        help="where data, models, runs and results go (default runs/kv-arithmetic, runs/real-anchor or "
                             "runs/lm-cocktail)")
    parser.add_argument("--retrain", action="store_true",
                        help="train the composition again even if this seed's run has finished")
    parser.add_argument("--tiny", action="store_true", help="train configs/tiny.yaml only (about a minute)")
    parser.add_argument("--steps", type=int, default=None, help="with --tiny: override training.steps")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray, DeepSpeed and library output here instead of in the run's log file")


def toy_records(count: int, seed: int) -> list[dict]:
    """Two-digit additions written as text: the completion is the sum."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        records.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return records


def make_assets(folder: Path, seed: int = 0) -> None:
    from calm_dist.testing.tiny_models import tiny_model
    from calm_dist.testing.tokenizers import tiny_tokenizer

    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(128)
    for name, width, heads, model_seed in (("anchor", 128, 4, seed), ("augmenting", 64, 4, seed + 1)):
        tiny_model("llama", layers=4, width=width, heads=heads, vocab=128, seed=model_seed).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    for split, count, split_seed in (("train", 512, seed), ("eval", 64, seed + 1000)):
        lines = "".join(json.dumps(r) + "\n" for r in toy_records(count, split_seed))
        (folder / f"{split}.jsonl").write_text(lines)
    (folder / "done").write_text("")


def run(args: argparse.Namespace) -> int:
    from launcher.runtime.quiet import log_path, quiet_output

    if args.tiny:
        return _run_tiny(args)
    if args.experiment == "cocktail":
        return _run_cocktail(args)
    if args.experiment == "real":
        return _run_real(args)
    from launcher.kv_arithmetic.experiment import CONFIG, ROOT, run_experiment
    from launcher.kv_arithmetic.report import text_table, write_report

    root = Path(args.root or ROOT).resolve()
    folder = root / f"seed-{args.seed}"
    with quiet_output(log_path(folder, "demo"), verbose=args.verbose):
        results = run_experiment(root, args.seed, print, Path(args.config or CONFIG), retrain=args.retrain)
        paths = write_report(results, folder / "results")
    print()
    print(text_table(results))
    print(f"\nexact match in %; composition {results['composition_parameters']:,} trainable parameters, "
          f"LoRA {results['lora_parameters']:,}; {results['wall_s']:.0f} s")
    print(f"results: {paths['markdown']}  {paths['json']}  {paths['chart']}")
    return 0


def _run_cocktail(args: argparse.Namespace) -> int:
    from launcher.lm_cocktail.experiment import ROOT, TARGETS, run_experiment, targets_missed
    from launcher.lm_cocktail.report import summary, text_table, write_report
    from launcher.runtime.quiet import log_path, quiet_output

    root = Path(args.root or ROOT).resolve()
    folder = root / f"seed-{args.seed}"
    with quiet_output(log_path(folder, "demo"), verbose=args.verbose):
        results = run_experiment(root, args.seed, print)
        paths = write_report(results, folder / "results")
    print()
    print(text_table(results))
    print(f"\n{summary(results)}; {results['wall_s']:.0f} s")
    missed = targets_missed(results)
    print(f"targets (issue #22): {len(TARGETS) - len(missed)} of {len(TARGETS)} met" + "".join(f"\n  missed: {m}" for m in missed))
    print(f"merged models: {folder / 'cocktail'}  {folder / 'mix'}")
    print(f"results: {paths['markdown']}  {paths['json']}  {paths['chart']}")
    return 0


def _run_real(args: argparse.Namespace) -> int:
    from launcher.real_anchor.experiment import CONFIG, ROOT, TARGETS, run_experiment, targets_missed
    from launcher.real_anchor.report import summary, text_table, write_report
    from launcher.runtime.quiet import log_path, quiet_output

    root = Path(args.root or ROOT).resolve()
    folder = root / f"seed-{args.seed}"
    with quiet_output(log_path(folder, "demo"), verbose=args.verbose):
        results = run_experiment(root, args.seed, print, Path(args.config or CONFIG), retrain=args.retrain)
        paths = write_report(results, folder / "results")
    print()
    print(text_table(results))
    print(f"\n{summary(results)}; {results['wall_s']:.0f} s")
    missed = targets_missed(results)
    print(f"targets (issue #23): {len(TARGETS) - len(missed)} of {len(TARGETS)} met" + "".join(f"\n  missed: {m}" for m in missed))
    print(f"composition: {root / 'runs' / f'composition-seed-{args.seed}' / 'composition'}")
    print(f"results: {paths['markdown']}  {paths['json']}  {paths['chart']}")
    return 0


def _run_tiny(args: argparse.Namespace) -> int:
    from launcher.preflight import describe, preflight
    from launcher.runtime.quiet import log_path, quiet_output
    from launcher.train.command import train
    from launcher.train_config import load_config

    overrides = {"training.steps": args.steps} if args.steps else {}
    config = load_config(args.config or TINY_CONFIG, overrides)
    with quiet_output(log_path(config.run_dir, "demo"), verbose=args.verbose):
        make_assets(Path(config.models.anchor.path).parent)
        print(describe(preflight(config)))
        return train(config)
