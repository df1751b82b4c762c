"""calm-dist's launcher: the `calm` command (launcher.cli) and its jobs, one package per subcommand.

`from launcher import evaluate, evaluate_files` scores a composition from Python (launcher.eval.command);
they are imported on first use, so `import launcher`, which every `calm` command does, stays free of
pydantic, torch and Ray.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# The checkout this package runs from: its configs/ (the demo's) and runs/ (the experiment's default).
REPO = Path(__file__).resolve().parent.parent

# name -> the module that defines it, imported when the name is first read
_LAZY = {"evaluate": "launcher.eval.command", "evaluate_files": "launcher.eval.command"}

__all__ = ["evaluate", "evaluate_files"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
