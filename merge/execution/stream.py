"""One output tensor as a stream of chunks, each computed into a buffer from a fixed pool.

Inputs are read ahead in the planned order (merge.io.reader), combined block by block and rounded once
to the output dtype into a buffer taken from a fixed pool.

Chunks are ranges of the flattened tensor (row chunks are the case of a row-aligned range), always
whole blocks of the tensor's method (BLOCK elements, or whole rows: OutputTensor.block), so the blocks
a method sees are the same whatever the chunk size. Memory
per chunk is bounded twice: output buffers come from a fixed pool, inputs from a few reused buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from merge.execution.vocab_rows import merge_rows
from merge.io.reader import Chunk, InputFiles, held, tensor_chunks
from merge.io.safetensors_file import ITEMSIZE, TensorInfo
from merge.methods.blocks import as_floats
from merge.methods.registry import METHODS, Block, Method
from merge.methods.specs import BLOCK
from merge.planning.plan import COMPUTE_THREADS, COPY, OutputTensor

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


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


def _view(files: InputFiles, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of an input of the chunk being read, in its buffer (no copy)."""
    slot, offset = files.locate(info, start)
    return torch.frombuffer(slot, dtype=TORCH_DTYPES[info.dtype], count=stop - start, offset=offset)


def _blocks(files: InputFiles, sources: Sequence[TensorInfo], start: int, stop: int, step: int
            ) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """A statistic pass's blocks: each input's values as stored, in the read buffer (merge.methods.blocks.Blocks)."""
    for begin in range(start, stop, step):
        end = min(begin + step, stop)
        yield begin, [_view(files, s, begin, end) for s in sources]


Walk = Callable[[], Iterator[Chunk]]


def _walk(files: InputFiles, chunks: list[Chunk]) -> Iterator[Chunk]:
    """One pass over the chunks, each readable while it is computed."""
    for chunk in chunks:
        with files.reading(chunk):
            yield chunk


def _statistic(method: Method, files: InputFiles, walk: Walk, chunks: list[Chunk], tensor: OutputTensor, params: Any,
               one_read: bool) -> Any:
    """The method's whole-tensor statistic, from up to `spec.reads - 1` passes (`walk()`) over the
    tensor's blocks. Unless the tensor is held (one chunk, read once), the reader has those passes
    queued; whatever the statistic leaves unread (TIES keeping nothing needs no pass at all) is
    stepped through uncomputed, so the merge pass finds its chunks next."""
    planned = (method.spec.reads - 1) * len(chunks)
    walked = 0
    passes: list[Iterator[tuple[Block, list[torch.Tensor]]]] = []

    def blocks() -> Iterator[tuple[Block, list[torch.Tensor]]]:
        nonlocal walked
        for chunk in walk():
            walked += 1
            for begin, xs in _blocks(files, chunk.sources, chunk.start, chunk.stop, tensor.block):
                yield _block(tensor, begin, begin + len(xs[0])), xs

    def new_pass() -> Iterator[tuple[Block, list[torch.Tensor]]]:
        passes.append(blocks())
        return passes[-1]

    stats = method.prepare(new_pass, tensor.numel, params, tensor.weights)
    for started in passes:
        started.close()  # one left midway gives its chunk back
    if not one_read:
        for _ in _walk(files, list(itertools.islice(itertools.cycle(chunks), walked, planned))):
            pass
    return stats


def merge_tensor(
    tensor: OutputTensor, files: InputFiles, chunk_elems: int, pool: BufferPool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The output tensor's data in order, as (pool buffer, output-dtype view of it) per chunk; the
    consumer gives each buffer back to the pool once written."""
    numel = tensor.numel
    dtype = TORCH_DTYPES[tensor.dtype]
    if tensor.rows is not None:  # remapped by token: merged whole, then written out chunk by chunk
        whole = merge_rows(tensor, dtype)
        for start in range(0, numel, chunk_elems):
            stop = min(start + chunk_elems, numel)
            buffer = pool.take()
            out = buffer[: (stop - start) * ITEMSIZE[tensor.dtype]].view(dtype)
            out.copy_(whole[start:stop])
            yield buffer, out
        return
    method = METHODS.get(tensor.method)
    params = method.spec.params.model_validate(tensor.params) if method else None
    chunks = tensor_chunks(tensor, chunk_elems)
    one_read = held(tensor, chunks)
    with files.reading(chunks[0]) if one_read else contextlib.nullcontext():
        walk: Walk = (lambda: iter(chunks)) if one_read else (lambda: _walk(files, chunks))
        stats = None
        if method is not None and method.prepare is not None and numel > 0:
            stats = _statistic(method, files, walk, chunks, tensor, params, one_read)
        yield from _merge_chunks(tensor, files, walk(), method, params, stats, pool)


def _merge_chunks(tensor: OutputTensor, files: InputFiles, chunks: Iterator[Chunk], method: Method | None, params: Any,
                  stats: Any, pool: BufferPool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The merge pass: each chunk computed into a pool buffer, in order."""
    sources, dtype = tensor.sources, TORCH_DTYPES[tensor.dtype]
    # A method that takes any range gets one piece per thread, as stored; others get fp32 blocks.
    any_range = method is not None and method.spec.any_range
    for _, start, stop, _ in chunks:
        buffer = pool.take()
        out = buffer[: (stop - start) * ITEMSIZE[tensor.dtype]].view(dtype)
        if tensor.method == COPY:
            out.copy_(_view(files, sources[0], start, stop))
        else:
            step = _piece(stop - start) if any_range else tensor.block

            def compute(begin: int, start: int = start, stop: int = stop, out: torch.Tensor = out, step: int = step) -> None:
                end = min(begin + step, stop)
                xs = [_view(files, s, begin, end) for s in sources]
                xs = xs if any_range or method.spec.stored_blocks else as_floats(xs)
                block = _block(tensor, begin, end)
                piece = out[begin - start : end - start]
                if any_range:  # exact: rounded once, straight into the output buffer
                    method.combine(xs, tensor.weights, params, stats, block, out=piece)
                else:  # copy_ rounds the fp32 result to the output dtype: the one rounding of the merge
                    piece.copy_(method.combine(xs, tensor.weights, params, stats, block))

            # Pieces are independent (each writes its own slice; randomness is per block), so they are
            # computed on COMPUTE_THREADS threads: torch releases the GIL inside every op.
            for done in _compute_pool().map(compute, range(start, stop, step)):
                del done
        yield buffer, out


def _block(tensor: OutputTensor, begin: int, end: int) -> Block:
    return Block(tensor.name, begin // tensor.block, end - begin, tensor.seed, TORCH_DTYPES[tensor.dtype], tensor.shape)


def _piece(elements: int) -> int:
    """A chunk split evenly between the compute threads, in whole blocks, at most MAX_PIECE."""
    return min(-(-elements // (COMPUTE_THREADS * BLOCK)) * BLOCK, MAX_PIECE)


# Each piece's result is a temporary (up to 16 MB per thread), counted in the plan's WORKER_OVERHEAD.
MAX_PIECE = 16 * BLOCK


_POOL: ThreadPoolExecutor | None = None


def _compute_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(COMPUTE_THREADS, thread_name_prefix="merge-compute")
    return _POOL
