"""Old module paths kept for one release after the layout change (calm-dist 0.2): each forwards the names
it had to the module that holds them now, with a DeprecationWarning naming the new import."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def forwarding(old: str, new: str) -> Callable[[str], object]:
    """A module-level __getattr__ for `old` that serves `new`'s names."""

    def __getattr__(name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn(f"{old} is deprecated and goes in the next release: import {name} from {new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    return __getattr__
