"""The statistic passes' work on each model's block, on the machine's cores.

A statistic pass (thresholds, norms, ranks) reads a tensor the reader already holds, so while one
model's block is counted the other core would wait: the models' blocks are independent (each has its
histogram or sums of its own), so they are counted side by side. The compiled counts and torch's ops
release the GIL. The merge pass has its own threads (merge.execution.stream): this is for statistics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

THREADS = min(2, os.cpu_count() or 1)
_POOL: ThreadPoolExecutor | None = None


def each_model(work: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """[work(item) for item in items], the items on up to THREADS threads at once."""
    global _POOL
    if len(items) < 2 or THREADS < 2:
        return [work(item) for item in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(THREADS, thread_name_prefix="merge-statistic")
    return list(_POOL.map(work, items))
