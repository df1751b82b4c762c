"""Running shard tasks on this machine: in this process for one worker, else a process pool.

Each finished shard is reported to `on_done` in the calling process (which records it in the
manifest), and written bytes to `progress` as they are written, from whichever process writes them.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from merge.execution.shard import Progress, ShardResult, run_shard, run_shards
from merge.io.reader import InputFiles
from merge.planning.plan import ShardTask

_worker_progress: multiprocessing.Queue | None = None


def _init_worker(progress: multiprocessing.Queue) -> None:
    global _worker_progress
    _worker_progress = progress


def _run_in_worker(task: ShardTask) -> ShardResult:
    assert _worker_progress is not None
    return run_shard(task, _worker_progress.put)


def run_local(
    tasks: list[ShardTask], workers: int, on_done: Callable[[ShardResult], None], progress: Progress,
    files: InputFiles | None = None,
) -> None:
    """`files`: with one worker, the tasks' reads already under way (merge.io.reader.read_ahead)."""
    if workers == 1 or len(tasks) <= 1:
        # One worker needs no pool: no process start, no second copy of torch in memory.
        run_shards(tasks, on_done, progress, files)
        return
    # spawn, not fork: the parent may hold torch thread pools and Ray/tqdm threads that fork would copy
    # in an undefined state.
    context = multiprocessing.get_context("spawn")
    written: multiprocessing.Queue = context.Queue()
    with ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=context, initializer=_init_worker, initargs=(written,)
    ) as pool:
        pending = {pool.submit(_run_in_worker, task) for task in tasks}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(written, progress)
                for future in done:
                    on_done(future.result())
            _drain(written, progress)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _drain(written: multiprocessing.Queue, progress: Progress) -> None:
    while True:
        try:
            progress(written.get_nowait())
        except queue.Empty:
            return
