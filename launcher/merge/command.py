"""`calm merge`: build an LM-Cocktail blend (or another merge) by streaming safetensors checkpoints.

TIES, DARE, SLERP and task arithmetic too; --verify re-checks a finished merge.

Only argparse is imported at the top: `calm --help` must stay instant; torch comes with run().
"""

from __future__ import annotations

import argparse

from merge.merge_errors import MergeError

USER_ERRORS = (MergeError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML merge config (fields documented in configs/cocktail-tiny.yaml)")
    parser.add_argument("-o", "--output", help="output folder (overrides output.path)")
    parser.add_argument("--workers", type=int, help="shard tasks at once on this machine (overrides workers)")
    parser.add_argument("--memory-budget", help="peak memory for the whole merge, e.g. 2GB (overrides memory_budget)")
    parser.add_argument(
        "--address",
        help="run shard tasks on a Ray cluster: 'auto', 'ray://head:10001', or 'local' for a Ray started here",
    )
    parser.add_argument("--verify", metavar="OUT", help="re-check a finished merge against its manifest, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from merge.merge_errors import ConfigError

    if args.verify:
        from merge.io.manifest import verify
        from merge.io.report import dropped_lines

        problems = verify(Path(args.verify))
        for line in dropped_lines(Path(args.verify)):
            print(f"{args.verify}: {line}")
        for problem in problems:
            print(f"{args.verify}: {problem}")
        print(f"{args.verify}: {'FAILED' if problems else 'OK'}")
        return 1 if problems else 0
    if not args.config:
        raise ConfigError("give a config file to merge, or --verify OUT to check a merge")
    from launcher.runtime.ray_start import start_ray
    from merge.job import run_merge
    from merge.merge_config import load_config

    # A path given on the command line is relative to where the command runs, not to the config.
    output = str(Path(args.output).absolute()) if args.output else None
    updates = {"output.path": output, "workers": args.workers, "memory_budget": args.memory_budget}
    cfg = load_config(args.config, {k: v for k, v in updates.items() if v is not None})
    # Ray only where a step needs it (--address, weights_from_examples.workers > 1), started then, and an
    # embedded cluster shut down after its step.
    run_merge(cfg, address=args.address, show_progress=not args.no_progress, start_ray=start_ray)
    return 0
