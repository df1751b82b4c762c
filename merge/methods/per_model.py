"""The statistic passes' work on each model's block, on the machine's cores.

A statistic pass reads a tensor the reader already holds, so while one model's block is worked on the
other core would wait: the models' blocks are independent (each has sums of its own), so they are
worked on side by side; the compiled code and torch's ops release the GIL. Used where the work per
block is large (the L1 norms of DELLA's rank-masked task vectors: della_linear 13.6 -> 10.5 s on a
6-layer model); a magnitude histogram's count of a block (~130 us) gained nothing against the hand-off.
The merge pass has its own threads (merge.execution.stream).
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
