"""`calm eval`: the command (launcher.eval.command), its job schema (job) and its workers (worker).

`evaluate` and `evaluate_files` are re-exported here, imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["evaluate", "evaluate_files"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("launcher.eval.command"), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
