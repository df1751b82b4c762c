"""One output tensor as a stream of chunks: inputs read through memory maps, combined block by block in
fp32, rounded once to the output dtype into a buffer taken from a fixed pool.

Chunks are ranges of the flattened tensor (row chunks are the case of a row-aligned range), always a
multiple of BLOCK elements, so the blocks a method sees are the same whatever the chunk size. Memory
per chunk is bounded twice: output buffers come from a fixed pool, and input pages are unmapped once
their chunk is computed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from merge.methods import BLOCK, METHODS, Block
from merge.plan import COPY, OutputTensor
from merge.safetensors_io import ITEMSIZE, TORCH_DTYPES, MappedFile, TensorInfo


class _Ticket:
    """One chunk's input ranges, queued for the read-ahead thread."""

    def __init__(self, ranges: list[tuple[MappedFile, int, int]]) -> None:
        self.ranges = ranges
        self.lock = threading.Lock()
        self.skip = False


class InputFiles:
    """The memory-mapped input files of one task, each opened on first use, and a read-ahead thread.

    The thread faults in the pages of the chunk after the one being computed (waiting on the disk so
    the arithmetic does not). madvise(WILLNEED) alone is not enough: the kernel caps it at the
    device's read-ahead size (often 128 KB to 8 MB), far less than a chunk.
    """

    def __init__(self) -> None:
        self._files: dict[str, MappedFile] = {}
        self._tickets: dict[tuple, _Ticket] = {}
        self._queue: queue.Queue[_Ticket | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read_ahead, name="merge-read-ahead", daemon=True)
        self._thread.start()

    def view(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        return self._file(info.path).view(info, start, stop)

    def _file(self, path: str) -> MappedFile:
        if path not in self._files:
            self._files[path] = MappedFile(path)
        return self._files[path]

    def _ranges(self, sources: Sequence[TensorInfo], start: int, stop: int) -> list[tuple[MappedFile, int, int]]:
        return [
            (self._file(s.path), s.offset + start * ITEMSIZE[s.dtype], (stop - start) * ITEMSIZE[s.dtype])
            for s in sources
        ]

    def prefetch(self, sources: Sequence[TensorInfo], start: int, stop: int) -> None:
        """Queue a chunk for reading ahead (once; a chunk already queued is left alone)."""
        key = (tuple(sources), start, stop)
        if key not in self._tickets:
            self._tickets[key] = _Ticket(self._ranges(sources, start, stop))
            self._queue.put(self._tickets[key])

    def advise(self, sources: Sequence[TensorInfo], start: int, stop: int) -> None:
        """Start reading a later chunk into the page cache (not mapped: no memory of ours), so the disk
        stays busy while the chunks before it are read ahead and computed."""
        for file, offset, length in self._ranges(sources, start, stop):
            file.advise(offset, length)

    def _read_ahead(self) -> None:
        while (ticket := self._queue.get()) is not None:
            with ticket.lock:
                for file, offset, length in ticket.ranges if not ticket.skip else ():
                    file.touch(offset, length)

    @contextlib.contextmanager
    def reading(self, sources: Sequence[TensorInfo], start: int, stop: int) -> Iterator[None]:
        """Around the computation of one chunk: its read-ahead, if not started, is no longer needed;
        afterwards its pages are unmapped (after any read-ahead of them is done, so none stays mapped)."""
        ticket = self._tickets.pop((tuple(sources), start, stop), None)
        if ticket is not None:
            ticket.skip = True
        yield
        with ticket.lock if ticket is not None else contextlib.nullcontext():
            for file, offset, length in self._ranges(sources, start, stop):
                file.release(offset, length)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        for file in self._files.values():
            # BufferError: a view is still referenced (an error is unwinding); the GC unmaps it later.
            with contextlib.suppress(BufferError):
                file.close()
        self._files.clear()


class BufferPool:
    """A fixed set of byte buffers for output chunks. take() blocks until the writer gives one back,
    which bounds the memory held by chunks in flight."""

    def __init__(self, count: int, nbytes: int) -> None:
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))

    def take(self) -> torch.Tensor:
        return self._free.get()

    def give(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)


def chunk_ranges(numel: int, chunk_elems: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_elems, numel)) for start in range(0, numel, chunk_elems)]


def _blocks(files: InputFiles, sources: Sequence[TensorInfo], start: int, stop: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
    for begin in range(start, stop, BLOCK):
        end = min(begin + BLOCK, stop)
        yield begin, [files.view(s, begin, end).float() for s in sources]


Chunk = tuple[Sequence[TensorInfo], int, int]


def _walk(
    files: InputFiles, sources: Sequence[TensorInfo], ranges: list[tuple[int, int]], then: Chunk | None
) -> Iterator[tuple[int, int]]:
    """The chunk ranges in order, each read ahead while the one before it is computed; `then`, the
    chunk read after these, is read ahead during the last one."""
    for i, (start, stop) in enumerate(ranges):
        following = (sources, *ranges[i + 1]) if i + 1 < len(ranges) else then
        if following is not None:
            files.prefetch(*following)
        if i + 2 < len(ranges):
            files.advise(sources, *ranges[i + 2])
        with files.reading(sources, start, stop):
            yield start, stop


def _whole(files: InputFiles, sources: Sequence[TensorInfo], ranges: list[tuple[int, int]]) -> Iterator[list[torch.Tensor]]:
    """Every block of the tensor in order, for a method's whole-tensor statistic."""
    for start, stop in _walk(files, sources, ranges, then=(sources, *ranges[0])):
        for _, xs in _blocks(files, sources, start, stop):
            yield xs


def first_chunk(tensor: OutputTensor, chunk_elems: int) -> Chunk | None:
    return (tensor.sources, 0, min(chunk_elems, tensor.numel)) if tensor.numel else None


def merge_tensor(
    tensor: OutputTensor, files: InputFiles, chunk_elems: int, pool: BufferPool, then: Chunk | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The output tensor's data in order, as (pool buffer, output-dtype view of it) per chunk; the
    consumer gives each buffer back to the pool once written. `then` is read ahead at the end."""
    numel, sources = tensor.numel, tensor.sources
    dtype = TORCH_DTYPES[tensor.dtype]
    method = METHODS.get(tensor.method)
    params = method.params.model_validate(tensor.params) if method else None
    ranges = chunk_ranges(numel, chunk_elems)
    stats = None
    if method is not None and method.prepare is not None and numel > 0:
        stats = method.prepare(lambda: _whole(files, sources, ranges), numel, params)
    for start, stop in _walk(files, sources, ranges, then):
        buffer = pool.take()
        out = buffer[: (stop - start) * ITEMSIZE[tensor.dtype]].view(dtype)
        if tensor.method == COPY:
            out.copy_(files.view(sources[0], start, stop))
        else:
            # A method that takes any range gets one piece per thread, as stored; others get fp32 blocks.
            step = _piece(stop - start) if method.any_range else BLOCK

            def compute(begin: int, start: int = start, stop: int = stop, out: torch.Tensor = out, step: int = step) -> None:
                end = min(begin + step, stop)
                xs = [files.view(s, begin, end) for s in sources]
                xs = xs if method.any_range else [x.float() for x in xs]
                block = Block(tensor.name, begin // BLOCK, end - begin, tensor.seed, dtype)
                # copy_ rounds an fp32 result to the output dtype: the one rounding of the merge (exact
                # methods return the output dtype already).
                out[begin - start : end - start].copy_(method.combine(xs, tensor.weights, params, stats, block))

            # Pieces are independent (each writes its own slice; randomness is per block), so they are
            # computed on COMPUTE_THREADS threads: torch releases the GIL inside every op.
            for done in _compute_pool().map(compute, range(start, stop, step)):
                del done
        yield buffer, out


def _piece(elements: int) -> int:
    """A chunk split evenly between the compute threads, in whole blocks, at most MAX_PIECE."""
    return min(-(-elements // (COMPUTE_THREADS * BLOCK)) * BLOCK, MAX_PIECE)


# Each piece's result is a temporary (up to 16 MB per thread), counted in the plan's WORKER_OVERHEAD.
MAX_PIECE = 16 * BLOCK


COMPUTE_THREADS = min(2, os.cpu_count() or 1)
_POOL: ThreadPoolExecutor | None = None


def _compute_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(COMPUTE_THREADS, thread_name_prefix="merge-compute")
    return _POOL
