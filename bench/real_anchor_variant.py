"""A variant of the real-anchor composition, measured without the baselines: the world's data and m_A
(cached under --root), `calm train` with configs/real-anchor.yaml and the given settings, `calm eval`
on the held-out and D_C people, the general scores, and which general prompts the composition answers
differently from SmolLM2. Prints one JSON line. About 20 minutes with m_A cached, against the whole
experiment's 35 (bench/real_anchor.py, which adds m_A, m_B and LoRA alone).

    .venv/bin/python bench/real_anchor_variant.py --seed 2 --root /tmp/ra --set composition.hide_unknown_tokens=true
    .venv/bin/python bench/real_anchor_variant.py --seed 2 --train-seed 7 --root /tmp/ra   # another run, same world
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", required=True, help="work folder (m_A and the data are reused from it)")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="the composition's training seed (its init and data order); default --seed, as the "
                             "experiment ties them: another one shows what of a result is one run's noise")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a `calm train` setting other than configs/real-anchor.yaml's (value parsed as YAML)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from calm_dist.model.composition_checkpoint import load_composition
    from launcher.eval.command import evaluate_files
    from launcher.general_ability import ALL_GENERAL_PROMPTS, general_completions
    from launcher.preflight import preflight
    from launcher.real_anchor import data as world_data
    from launcher.real_anchor.experiment import (
        CONFIG,
        Design,
        _load,
        general_results,
        prepare,
        training_config,
    )
    from launcher.runtime.ray_start import stop_ray
    from launcher.train.command import train
    from launcher.train_config import ConfigError, parse_overrides

    try:
        settings = tuple(parse_overrides(args.set).items())
    except ConfigError as err:
        parser.error(str(err))
    start = time.time()
    root = Path(args.root).resolve()
    assets = prepare(root / f"seed-{args.seed}", args.seed, Design(training=settings), print)
    # A run name allows [A-Za-z0-9_.-]: a list value ("composition.connections=[[0,-1,23]]") loses the rest.
    train_seed = args.seed if args.train_seed is None else args.train_seed
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "variant-" + "-".join(f"{k}_{v}" for k, v in settings))[:80] + f"-s{args.seed}"
    name += f"-t{train_seed}" if train_seed != args.seed else ""
    config = training_config(CONFIG, assets, args.seed, name, root / "runs", root / "ray", settings)
    config = config.model_copy(update={"training": config.training.model_copy(update={"seed": train_seed})})
    preflight(config)
    composition = Path(config.output_dir) / name / "composition"
    try:  # calm eval on the cluster calm train started, as the experiment does
        if train(config) != 0:
            raise SystemExit(f"calm train failed; see {Path(config.output_dir) / name}")
        evaluated = evaluate_files(composition, [assets.files[s] for s in world_data.EVAL_SETS.values()], workers=1,
                                   max_new_tokens=1, micro_batch_size=32, progress=False)
    finally:
        stop_ray()
    result = {"settings": dict(settings), "seed": args.seed, "train_seed": train_seed,
              **{f"composed_{k}": r["exact_match"] for k, r in zip(world_data.EVAL_SETS, evaluated, strict=True)}}
    anchor, tokenizer = _load(assets.anchor)
    specialist, specialist_tokenizer = _load(assets.specialist)
    composed = load_composition(composition, anchor, [specialist], tokenizers=[tokenizer, specialist_tokenizer]).eval()
    result.update(general_results("composed", composed, tokenizer,
                                  general_completions(anchor, tokenizer, ALL_GENERAL_PROMPTS)))
    result["wall_s"] = round(time.time() - start)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
