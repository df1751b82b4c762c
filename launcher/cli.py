"""The `calm` command: one subcommand per job, each defined in its own module.

Subcommand modules are imported only when chosen, so `calm merge` never imports Ray or DeepSpeed
unless it needs them, and `calm --help` is instant.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

# name -> (module, one-line help). Each module defines add_arguments(parser), run(args) -> int and
# USER_ERRORS, the exception types that mean bad input: those print one clear line and exit 2.
# Modules import their heavy dependencies inside run(), keeping `calm --help` fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("launcher.demo.command", "the main jobs: CALM on tiny models (embedded local Ray), `real`: CALM on the real "
             "SmolLM2 anchor, or `cocktail`: LM-Cocktail on SmolLM2"),
    "train": ("launcher.train.command", "train a composition: Ray Train workers running DeepSpeed ZeRO-3"),
    "submit": ("launcher.submit.command", "submit a training config as a job to a Ray cluster"),
    "eval": ("launcher.eval.command", "score a composition, or one base model alone, on prompt/completion data"),
    "generate": ("launcher.generate.command", "complete prompts with a saved composition and its base models"),
    "merge": ("launcher.merge.command", "build an LM-Cocktail blend by streaming safetensors checkpoints"),
    "plan": ("launcher.plan.command", "will it fit? memory per worker of a training or merge config, from model configs only"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the subcommand the command line names, only that one's arguments (the
    others' modules stay unimported: `calm merge` starts reading sooner without the training config)."""
    parser = argparse.ArgumentParser(prog="calm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        if command in (None, name):
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None).parse_args(argv)
    # merge never imports DeepSpeed, and loads torch only once its reads are under way (merge.job).
    if "DS_ACCELERATOR" not in os.environ and args.command != "merge":
        import torch

        # DeepSpeed would pick the CPU here anyway, but says so on stdout when it has to guess, from
        # whichever library imports it first.
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    module = importlib.import_module(args._module)
    try:
        code = module.run(args)
    except tuple(getattr(module, "USER_ERRORS", ())) as err:
        print(f"calm {args.command}: error: {err}", file=sys.stderr)
        _name_log()
        code = 2
    except KeyboardInterrupt:
        print(f"calm {args.command}: interrupted", file=sys.stderr)
        code = 130
    except Exception as err:
        from launcher.runtime.quiet import last_log, one_line

        if last_log() is None:  # not a quiet command: the traceback is the report
            raise
        print(f"calm {args.command}: failed: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        _name_log()
        code = 1
    # The interpreter's last collection at exit walks every object torch created (0.4 s here);
    # frozen objects are left to the process's end.
    gc.freeze()
    raise SystemExit(code)


def _name_log() -> None:
    """After an error of a quiet command, say where the whole story is."""
    quiet = sys.modules.get("launcher.runtime.quiet")
    if quiet is not None and quiet.last_log() is not None:
        print(f"log: {quiet.last_log()}", file=sys.stderr)


if __name__ == "__main__":
    main()
