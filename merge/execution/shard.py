"""Running one shard task: the unit of work a local process or a Ray task executes.

Three things overlap: reader threads read the coming chunks' inputs (merge.io.reader), this thread and the
compute threads do the arithmetic (torch and the compiled pass release the GIL), and a writer thread
hashes finished chunks into staging buffers that the writer's disk thread writes out (ShardWriter; all
of it releases the GIL too). The file appears under its final name only when complete and synced.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge.execution.stream import BufferPool, merge_tensor
from merge.io.output_folder import writing
from merge.io.reader import InputFiles, read_ahead
from merge.io.safetensors_file import ITEMSIZE, ShardWriter
from merge.planning.plan import OUT_BUFFERS, ShardTask

# glibc's mallopt parameters.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Flush written data every so often, so the disk writes while we compute instead of all at commit().
SYNC_EVERY = 256 * 2**20

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ShardResult:
    filename: str
    sha256: str
    nbytes: int


class _WriteBehind:
    """A thread that writes and hashes chunks in order and gives their buffers back to the pool."""

    def __init__(self, writer: ShardWriter, pool: BufferPool, progress: Progress | None) -> None:
        self._writer, self._pool, self._progress = writer, pool, progress
        self._queue: queue.Queue[tuple[torch.Tensor, torch.Tensor] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="merge-writer", daemon=True)
        self._thread.start()

    def put(self, buffer: torch.Tensor, data: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((buffer, data))

    def _run(self) -> None:
        unsynced = 0
        while (item := self._queue.get()) is not None:
            buffer, data = item
            if self._error is None:
                try:
                    self._writer.write(tensor_bytes(data))
                    unsynced += data.nbytes
                    if unsynced >= SYNC_EVERY:
                        self._writer.sync()
                        unsynced = 0
                    if self._progress is not None:
                        self._progress(data.nbytes)
                except BaseException as err:  # noqa: BLE001 - handed to the computing thread
                    self._error = err
            # Even after an error keep draining, so the computing thread never waits on the pool.
            self._pool.give(buffer)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _keep_freed_memory() -> None:
    """Stop glibc from handing freed block temporaries (a few MB per block) back to the kernel after
    every block: fresh pages must be faulted in and zeroed again, which costs more than the arithmetic
    (several times more in a VM)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 4 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)


def run_shard(task: ShardTask, progress: Progress | None = None) -> ShardResult:
    """Compute and write one output shard; returns its sha256 and size."""
    results: list[ShardResult] = []
    run_shards([task], results.append, progress)
    return results[0]


def run_shards(tasks: Sequence[ShardTask], on_done: Callable[[ShardResult], None], progress: Progress | None = None,
               files: InputFiles | None = None) -> None:
    """Shards one after another in this process, each reported to on_done once committed. They share
    the input and output buffers (faulted in once), and the inputs are read in one stream across
    shard boundaries: the disk never waits between shards. `files`: that stream already started
    (merge.io.reader.read_ahead(tasks)); its caller closes it."""
    if not tasks:
        return
    owned = files is None
    files = read_ahead(tasks) if owned else files
    # One arithmetic thread: block ops are small, and intra-op threads would spin on the cores the
    # reading and writing threads need (measured: 4x slower on 2 cores). Scale out with workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # The objects that exist now (torch's modules: hundreds of thousands) live on; out of the collector's
    # sight, its full collections, triggered by the many small objects of the block loop, stay cheap
    # (they held the GIL for ~2% of a merge's CPU time).
    gc.freeze()
    _keep_freed_memory()
    try:
        pool = BufferPool(OUT_BUFFERS, max(task.chunk_elems * max(ITEMSIZE[t.dtype] for t in task.tensors) for task in tasks))
        for task in tasks:
            on_done(_run_shard(task, progress, files, pool))
    finally:
        if owned:
            files.close()
        gc.unfreeze()
        torch.set_num_threads(threads)


def _run_shard(task: ShardTask, progress: Progress | None, files: InputFiles, pool: BufferPool) -> ShardResult:
    """One shard through the shared buffers."""
    path = Path(task.out_dir) / task.filename
    with writing(path):
        writer = ShardWriter(path, [(t.name, t.dtype, t.shape) for t in task.tensors])
    behind = _WriteBehind(writer, pool, progress)
    try:
        # A write's error (a full disk) surfaces at the next put() or at finish(); reads raise their own.
        with writing(path):
            for tensor in task.tensors:
                for buffer, data in merge_tensor(tensor, files, task.chunk_elems, pool):
                    behind.put(buffer, data)
            behind.finish()
            sha256, nbytes = writer.commit()
    except BaseException:
        with contextlib.suppress(BaseException):  # the first error is the one to report
            behind.finish()
        writer.abort()
        raise
    return ShardResult(task.filename, sha256, nbytes)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (numpy has no bfloat16, so go via uint8)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
