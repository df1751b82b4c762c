"""Reading the inputs chunk by chunk, one chunk ahead of the arithmetic, into two reused buffers.

Reads bypass the page cache (O_DIRECT) where the filesystem allows it: the disk writes straight into
our buffers. Through the page cache every byte costs a kernel copy and fresh cache pages; on a 2-core
VM, reading 6.6 GB took 10-11 s of CPU that way and 0.4-0.7 s direct, and a merge reads every input
byte once, so the cache gains nothing. Exceptions: tensors that a method reads twice (a whole-tensor
statistic first) are read through the cache, so the second pass finds them in memory; and where
O_DIRECT is refused (tmpfs, some network filesystems) every read is buffered.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import NamedTuple

import torch

from merge.errors import CheckpointError
from merge.safetensors_io import ALIGN, DIRECT, ITEMSIZE, TORCH_DTYPES, TensorInfo

# Threads reading inputs (they wait on the disk, not the CPU): a chunk's inputs and the next chunk's first.
READ_THREADS = 4


class Chunk(NamedTuple):
    """Elements [start, stop) of the same tensor in every input; `cached`: read through the page cache."""

    sources: tuple[TensorInfo, ...]
    start: int
    stop: int
    cached: bool = False


def slot_bytes(sources: Sequence[TensorInfo], elements: int) -> int:
    """Buffer room for a chunk of this many elements of these inputs (each range aligned both ends)."""
    return sum(-(-(elements * ITEMSIZE[s.dtype] + 2 * ALIGN) // ALIGN) * ALIGN for s in sources)


class InputFile:
    """One input file, open twice: for direct reads (where allowed) and through the page cache."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._buffered = os.open(path, os.O_RDONLY)
        try:
            self._direct = os.open(path, os.O_RDONLY | DIRECT) if DIRECT else None
        except OSError:  # EINVAL: this filesystem does not do direct I/O
            self._direct = None

    def span(self, offset: int, length: int, cached: bool) -> tuple[int, int, int]:
        """(descriptor, begin, end): how to read bytes [offset, offset + length). Direct reads are
        widened to whole blocks (the last may end past the end of the file, which reads short)."""
        if cached or self._direct is None:
            return self._buffered, offset, offset + length
        return self._direct, offset // ALIGN * ALIGN, -(-(offset + length) // ALIGN) * ALIGN

    def read(self, fd: int, slot: mmap.mmap, position: int, begin: int, end: int, needed: int) -> None:
        """File bytes [begin, end) through fd into the slot at `position`; at least up to `needed`."""
        got = 0
        with memoryview(slot)[position : position + end - begin] as target:
            try:
                while got < len(target) and (n := os.preadv(fd, [target[got:]], begin + got)):
                    got += n
            except OSError as err:
                raise CheckpointError(f"{self.path}: cannot be read: {err.strerror or err}") from err
        if begin + got < needed:
            raise CheckpointError(f"{self.path}: truncated while merging: it ends at byte {begin + got}, before {needed}")

    def close(self) -> None:
        for fd in (self._buffered, self._direct):
            if fd is not None:
                os.close(fd)


class _Ticket:
    """One chunk being read into a slot: each input's range by a reader thread."""

    def __init__(self, chunk: Chunk, slot: mmap.mmap, starts: list[int], reads: list[Future]) -> None:
        self.chunk, self.slot = chunk, slot
        self.starts = starts  # where each source's first element lies in the slot
        self.reads = reads


class InputFiles:
    """The input files of one task (each opened on first use), and the chunk being computed and the
    one read ahead, each in one of two reused slots of `slot_size` bytes (see slot_bytes).

    Reads are queued to a few threads as soon as a chunk is prefetched, each input's range on its own:
    more requests in flight keep the disk busier (three 2.2 GB files took 4.4 s read in parallel, 5.9 s
    one after another), and the next chunk's reads start while this one's last input is still coming.
    """

    def __init__(self, slot_size: int) -> None:
        self._slot_size = slot_size
        self._files: dict[str, InputFile] = {}
        self._free: list[mmap.mmap] = []
        self._slots: list[mmap.mmap] = []
        self._tickets: dict[Chunk, _Ticket] = {}
        self._current: dict[TensorInfo, tuple[mmap.mmap, int]] = {}
        self._current_start = 0
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="merge-read")

    def view(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of an input of the chunk being read (inside reading()), without a copy."""
        slot, base = self._current[info]
        offset = base + (start - self._current_start) * ITEMSIZE[info.dtype]
        return torch.frombuffer(slot, dtype=TORCH_DTYPES[info.dtype], count=stop - start, offset=offset)

    def prefetch(self, chunk: Chunk) -> None:
        """Start reading a chunk (once; a chunk already started is left alone)."""
        if chunk not in self._tickets:
            self._tickets[chunk] = self._start(chunk)

    @contextlib.contextmanager
    def reading(self, chunk: Chunk) -> Iterator[None]:
        """Around the computation of one chunk: waits for its reads (starting them if not prefetched),
        makes it view()able, and afterwards frees its slot for the chunk after next."""
        ticket = self._tickets.pop(chunk, None) or self._start(chunk)
        try:
            for read in ticket.reads:
                read.result()  # a read's error (CheckpointError) is raised here
            self._current = {s: (ticket.slot, start) for s, start in zip(chunk.sources, ticket.starts, strict=True)}
            self._current_start = chunk.start
            yield
        finally:
            self._current = {}
            wait(ticket.reads)  # after an error, other reads may still be writing into the slot
            self._free.append(ticket.slot)

    def _start(self, chunk: Chunk) -> _Ticket:
        slot = self._free.pop() if self._free else self._new_slot()
        position, starts, reads = 0, [], []
        for source in chunk.sources:
            if source.path not in self._files:
                self._files[source.path] = InputFile(source.path)
            file = self._files[source.path]
            itemsize = ITEMSIZE[source.dtype]
            offset, length = source.offset + chunk.start * itemsize, (chunk.stop - chunk.start) * itemsize
            fd, begin, end = file.span(offset, length, chunk.cached)
            reads.append(self._readers.submit(file.read, fd, slot, position, begin, end, offset + length))
            starts.append(position + offset - begin)
            position += -(-(end - begin) // ALIGN) * ALIGN
        return _Ticket(chunk, slot, starts, reads)

    def _new_slot(self) -> mmap.mmap:
        self._slots.append(mmap.mmap(-1, self._slot_size))  # anonymous maps are page-aligned
        return self._slots[-1]

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        for file in self._files.values():
            file.close()
        self._files.clear()
        for slot in self._slots:
            # BufferError: a view is still referenced (an error is unwinding); the GC unmaps it later.
            with contextlib.suppress(BufferError):
                slot.close()
