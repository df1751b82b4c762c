"""`calm demo`: the main job on this machine with no downloads.

Builds two tiny seeded models, a character tokenizer and a toy prompt/completion data set under
runs/demo-assets, then trains their composition with configs/tiny.yaml: two DeepSpeed ZeRO-3 workers
under an embedded local Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from calm_dist.errors import InputError

USER_ERRORS = (InputError,)  # ConfigError, DataError, CompositionError: also those met on the workers
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(CONFIG), help="demo training config")
    parser.add_argument("--steps", type=int, default=None, help="override training.steps")


def toy_records(count: int, seed: int) -> list[dict]:
    """Two-digit additions written as text: the completion is the sum."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        records.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return records


def make_assets(folder: Path, seed: int = 0) -> None:
    from calm_dist.tiny import tiny_model
    from calm_dist.tokenizer import tiny_tokenizer

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
    from launcher.config import load_config
    from launcher.preflight import describe, preflight
    from launcher.train import train

    overrides = {"training.steps": args.steps} if args.steps else {}
    config = load_config(args.config, overrides)
    make_assets(Path(config.models.anchor.path).parent)
    print(describe(preflight(config)))
    return train(config)
