"""Reading the inputs chunk by chunk, ahead of the arithmetic and in its order, into reused buffers.

Free of torch: `calm merge` starts reading before torch has loaded.

Reads bypass the page cache (O_DIRECT) where the filesystem allows it: the disk writes straight into
our buffers. Through the page cache every byte costs a kernel copy and fresh cache pages; on a 2-core
VM, reading 6.6 GB took 10-11 s of CPU that way and 0.4-0.7 s direct, and a merge reads every input
byte once, so the cache gains nothing. A tensor a method reads more than once (a whole-tensor
statistic first) is read once and held for every pass when it fits one chunk; one of several chunks
is read through the cache, so later passes find it in memory. Where O_DIRECT is refused (tmpfs, some
network filesystems) every read is buffered.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import NamedTuple

from merge.io.safetensors_file import ALIGN, DIRECT, ITEMSIZE, TensorInfo, io_buffer
from merge.merge_errors import CheckpointError
from merge.methods.specs import SPECS
from merge.planning.plan import OutputTensor, ShardTask

# Threads reading inputs: they wait on the disk, not the CPU, and a disk behind a virtual machine reads
# faster the more requests are in flight (three files here: 1.1 GB/s with 4 requests of 32 MB, 1.3-1.7
# GB/s with 16-32). The read-ahead's room (merge.planning.plan.READ_AHEAD_BYTES) bounds the bytes in flight.
READ_THREADS = 16


class Chunk(NamedTuple):
    """Elements [start, stop) of the same tensor in every input; `cached`: read through the page cache."""

    sources: tuple[TensorInfo, ...]
    start: int
    stop: int
    cached: bool = False


def chunk_ranges(numel: int, chunk_elems: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_elems, numel)) for start in range(0, numel, chunk_elems)]


def passes(tensor: OutputTensor) -> int:
    """How many times the tensor's inputs are read in full (copied tensors: once)."""
    spec = SPECS.get(tensor.method)
    return spec.reads if spec is not None else 1


def tensor_chunks(tensor: OutputTensor, chunk_elems: int) -> list[Chunk]:
    """One pass over an output tensor's inputs, in chunks of whole blocks of its method. A tensor of
    several chunks read more than once goes through the page cache, so the later passes find it in
    memory; one of a single chunk is read once, directly, and held for every pass (held())."""
    ranges = chunk_ranges(tensor.numel, tensor.chunk(chunk_elems))
    cached = passes(tensor) > 1 and len(ranges) > 1
    return [Chunk(tuple(tensor.sources), start, stop, cached) for start, stop in ranges]


def held(tensor: OutputTensor, chunks: Sequence[Chunk]) -> bool:
    """Whether the tensor's passes all read its one chunk, held in its buffer: read once, no copy
    through the page cache (which costs more CPU than the arithmetic of most methods' passes)."""
    return passes(tensor) > 1 and len(chunks) == 1


def reading_order(tasks: Sequence[ShardTask]) -> Iterator[Chunk]:
    """Every chunk the shards will read, in order: each tensor once per pass of its method, or once
    when held. Vocabulary tensors remapped by token are read whole, apart (merge.execution.vocab_rows)."""
    for task in tasks:
        for tensor in (t for t in task.tensors if t.rows is None):
            chunks = tensor_chunks(tensor, task.chunk_elems)
            yield from chunks if held(tensor, chunks) else chunks * passes(tensor)


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


class _Slot:
    """A reused input buffer. Chunks share one while it has room: a norm's chunk is a few KB, an MLP
    projection's most of a slot, and with a slot per chunk 10 slots of 96 MB held 400 MB of a Llama's
    first chunks (the disk sat idle while torch loaded). Its room comes back once every chunk in it
    has been computed."""

    def __init__(self, size: int) -> None:
        self.buffer = io_buffer(size)
        self.used = 0  # bytes given to chunks since it was last empty
        self.chunks = 0  # chunks in it not yet computed


class _Ticket:
    """One chunk being read into a slot: each input's range by a reader thread."""

    def __init__(self, chunk: Chunk, slot: _Slot, starts: list[int], reads: list[Future]) -> None:
        self.chunk, self.slot = chunk, slot
        self.starts = starts  # where each source's first element lies in the slot
        self.reads = reads


class InputFiles:
    """The inputs of a sequence of chunks, read in that order into `slots` reused buffers of `slot_size`
    bytes each (see slot_bytes; a chunk never needs more): one holds the chunk being computed, the
    others the chunks read ahead. Each input file is opened on first use.

    Reading starts at construction, before the arithmetic can (a process spends a second or more
    importing torch), and stays as far ahead as the slots allow: a chunk's compute and hand-off to
    the writer vary, and the disk should never wait for them. Reads are queued to READ_THREADS
    threads, each input's range on its own: more requests in flight keep the disk busier.
    """

    def __init__(self, chunks: Iterable[Chunk], slot_size: int, slots: int = 2) -> None:
        if slots < 2:
            raise ValueError("InputFiles needs at least 2 slots: one computed, one read ahead")
        self._upcoming = iter(chunks)
        self._next: Chunk | None = None
        self._slot_size, self._slot_count = slot_size, slots
        self._files: dict[str, InputFile] = {}
        self._slots: list[_Slot] = []
        self._queue: deque[_Ticket] = deque()
        self._current: dict[TensorInfo, tuple[mmap.mmap, int]] = {}
        self._current_start = 0
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="merge-read")
        self._fill()

    def locate(self, info: TensorInfo, start: int) -> tuple[mmap.mmap, int]:
        """The buffer holding input `info` of the chunk being computed (inside reading()), and the byte
        offset of its element `start` there."""
        buffer, base = self._current[info]
        return buffer, base + (start - self._current_start) * ITEMSIZE[info.dtype]

    @contextlib.contextmanager
    def reading(self, chunk: Chunk) -> Iterator[None]:
        """Around the computation of the next chunk in order: waits for its reads, makes it locate()able,
        and afterwards gives its room back for chunks further on."""
        if not self._queue or self._queue[0].chunk != chunk:
            raise RuntimeError(f"merge reader: chunk {chunk.start}:{chunk.stop} of {chunk.sources[0].name!r} "
                               "asked for out of the planned order")
        ticket = self._queue.popleft()
        slot = ticket.slot
        try:
            for read in ticket.reads:
                read.result()  # a read's error (CheckpointError) is raised here
            self._current = {s: (slot.buffer, start) for s, start in zip(chunk.sources, ticket.starts, strict=True)}
            self._current_start = chunk.start
            yield
        finally:
            self._current = {}
            wait(ticket.reads)  # after an error, other reads may still be writing into the slot
            slot.chunks -= 1
            if slot.chunks == 0:
                slot.used = 0
        self._fill()

    def _fill(self) -> None:
        """Start reading the next chunks in order, as far as the slots have room."""
        while (chunk := self._peek()) is not None and (slot := self._room_for(chunk)) is not None:
            self._next = None
            self._queue.append(self._start(chunk, slot))

    def _peek(self) -> Chunk | None:
        if self._next is None:
            self._next = next(self._upcoming, None)
        return self._next

    def _room_for(self, chunk: Chunk) -> _Slot | None:
        """The first slot with room for this chunk (a new one while there may be more), else None."""
        need = slot_bytes(chunk.sources, chunk.stop - chunk.start)
        for slot in self._slots:
            if slot.used + need <= self._slot_size:
                return slot
        if len(self._slots) < self._slot_count:
            self._slots.append(_Slot(self._slot_size))
            return self._slots[-1]
        return None

    def _start(self, chunk: Chunk, slot: _Slot) -> _Ticket:
        position, starts, reads = slot.used, [], []
        for source in chunk.sources:
            if source.path not in self._files:
                self._files[source.path] = InputFile(source.path)
            file = self._files[source.path]
            itemsize = ITEMSIZE[source.dtype]
            offset, length = source.offset + chunk.start * itemsize, (chunk.stop - chunk.start) * itemsize
            fd, begin, end = file.span(offset, length, chunk.cached)
            reads.append(self._readers.submit(file.read, fd, slot.buffer, position, begin, end, offset + length))
            starts.append(position + offset - begin)
            position += -(-(end - begin) // ALIGN) * ALIGN
        slot.used += slot_bytes(chunk.sources, chunk.stop - chunk.start)
        slot.chunks += 1
        return _Ticket(chunk, slot, starts, reads)

    def close(self) -> None:
        """Stop reading (queued reads are dropped) and free everything; idempotent."""
        self._readers.shutdown(wait=True, cancel_futures=True)
        for file in self._files.values():
            file.close()
        self._files.clear()
        for slot in self._slots:
            # BufferError: a view is still referenced (an error is unwinding); the GC unmaps it later.
            with contextlib.suppress(BufferError):
                slot.buffer.close()
        self._slots.clear()
        self._queue.clear()


def read_ahead(tasks: Sequence[ShardTask]) -> InputFiles:
    """Start reading these shards' inputs, in the order the shards will be merged, as far ahead as
    their plan allows (ShardTask.read_slots)."""
    slot = max((slot_bytes(t.sources, min(task.chunk_elems, t.numel)) for task in tasks for t in task.tensors
                if t.rows is None), default=ALIGN)
    return InputFiles(reading_order(tasks), slot, min(task.read_slots for task in tasks))
