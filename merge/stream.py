"""One output tensor as a stream of chunks: inputs read a chunk ahead (merge.reader), combined block by
block, rounded once to the output dtype into a buffer taken from a fixed pool.

Chunks are ranges of the flattened tensor (row chunks are the case of a row-aligned range), always a
multiple of BLOCK elements, so the blocks a method sees are the same whatever the chunk size. Memory
per chunk is bounded twice: output buffers come from a fixed pool, inputs from two reused buffers.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from merge.methods import BLOCK, METHODS, Block
from merge.plan import COPY, OutputTensor
from merge.reader import Chunk, InputFiles
from merge.safetensors_io import ITEMSIZE, TORCH_DTYPES, TensorInfo


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


def _walk(files: InputFiles, chunks: list[Chunk], then: Chunk | None) -> Iterator[Chunk]:
    """The chunks in order, each read ahead while the one before it is computed; `then`, the chunk
    read after these, is read ahead during the last one."""
    for i, chunk in enumerate(chunks):
        following = chunks[i + 1] if i + 1 < len(chunks) else then
        if following is not None:
            files.prefetch(following)
        with files.reading(chunk):
            yield chunk


def _whole(files: InputFiles, chunks: list[Chunk]) -> Iterator[list[torch.Tensor]]:
    """Every block of the tensor in order, for a method's whole-tensor statistic."""
    for chunk in _walk(files, chunks, then=chunks[0]):
        for _, xs in _blocks(files, chunk.sources, chunk.start, chunk.stop):
            yield xs


def _chunks(tensor: OutputTensor, chunk_elems: int) -> list[Chunk]:
    # A tensor read twice (a whole-tensor statistic, then the merge) goes through the page cache, so
    # the second read finds it in memory.
    method = METHODS.get(tensor.method)
    cached = method is not None and method.prepare is not None
    return [Chunk(tuple(tensor.sources), start, stop, cached) for start, stop in chunk_ranges(tensor.numel, chunk_elems)]


def first_chunk(tensor: OutputTensor, chunk_elems: int) -> Chunk | None:
    return _chunks(tensor, chunk_elems)[0] if tensor.numel else None


def merge_tensor(
    tensor: OutputTensor, files: InputFiles, chunk_elems: int, pool: BufferPool, then: Chunk | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The output tensor's data in order, as (pool buffer, output-dtype view of it) per chunk; the
    consumer gives each buffer back to the pool once written. `then` is read ahead at the end."""
    numel, sources = tensor.numel, tensor.sources
    dtype = TORCH_DTYPES[tensor.dtype]
    method = METHODS.get(tensor.method)
    params = method.params.model_validate(tensor.params) if method else None
    chunks = _chunks(tensor, chunk_elems)
    stats = None
    if method is not None and method.prepare is not None and numel > 0:
        stats = method.prepare(lambda: _whole(files, chunks), numel, params)
    for _, start, stop, _ in _walk(files, chunks, then):
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
