"""The flags that name a saved composition's base models and tokenizers, shared by `calm eval` and
`calm generate`: each overrides or completes what composition.json (or a training config) names."""

from __future__ import annotations

import argparse


def add_base_model_arguments(parser: argparse.ArgumentParser, *, from_config: bool) -> None:
    """--anchor, --augmenting, --tokenizer, --augmenting-tokenizer. from_config: the command also takes
    a training config, whose models are then the defaults."""
    config = "the config's, else " if from_config else ""
    parser.add_argument("--anchor", help=f"anchor model folder (default: {'from the config or ' if from_config else 'named in '}"
                        "composition.json)")
    parser.add_argument("--augmenting", action="append", metavar="PATH",
                        help="augmenting model folder, once per augmenting model (default: named in composition.json)")
    parser.add_argument("--tokenizer", help=f"tokenizer folder (default: {config}the anchor's)")
    parser.add_argument("--augmenting-tokenizer", action="append", metavar="PATH",
                        help="own tokenizer of an augmenting model, once per augmenting model, for a composition "
                        f"trained across tokenizers (default: {config}the model's folder)")
