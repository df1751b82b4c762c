"""Safetensors files read and written by hand: the one header reader, and a streaming writer.

The reader validates a header strictly against its file; the writer fixes its header before the first
data byte (reading element ranges is merge/io/reader.py's).

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and data_offsets of
each tensor, relative to the end of the header) and raw little-endian bytes. Handling it directly lets a
merge read one chunk of a 1B-element embedding without materialising the tensor, and write a shard
whose tensors arrive chunk by chunk, which the safetensors library's whole-dict API cannot do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import struct
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from merge.merge_errors import HeaderError

# The reference implementation's bound: a longer header means a corrupt length field, not a real file.
MAX_HEADER_BYTES = 100_000_000

# Every safetensors dtype code -> bytes per element (the one table: the training preflight sizes
# tensors with it too).
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# The codes a merge reads and writes (merge.execution.stream.TORCH_DTYPES has their torch dtypes);
# merge.io.checkpoint_folder refuses inputs with others.
MERGE_CODES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# Direct I/O (no page cache: see merge/io/reader.py) needs transfers that start and end on the device's
# logical block (512 or 4096 bytes), in memory and in the file.
ALIGN = 4096
DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the OS has none
# The writer's staging buffers for direct writes: one filled while the others are written.
STAGE_BYTES = 16 * 2**20
WRITE_STAGES = 3


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file (offset is absolute, from the file's start)."""

    path: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike) -> list[TensorInfo]:
    """Parse and validate a safetensors header against its file; tensors come back in file order.

    The checks are the reference loader's, so a corrupt or truncated file is named before any output
    exists, not when a loader trips over it: every entry well formed, of a known dtype, its byte count
    its shape's, and the tensors tiling the data section exactly (no overlap, no gap), which ends where
    the file ends. Errors are HeaderError (the file, and the problem on its own).
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError(path, f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise HeaderError(
                    path, f"truncated or not a safetensors file: the header claims {length} bytes but {size - 8} follow"
                )
            raw = f.read(length)
    except OSError as err:
        raise HeaderError(path, f"cannot read: {err.strerror}") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HeaderError(path, f"corrupt header: not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise HeaderError(path, "corrupt header: a JSON object was expected")
    data_start = 8 + length
    infos = [_parse_entry(path, name, entry, data_start) for name, entry in header.items() if name != "__metadata__"]
    infos.sort(key=lambda t: (t.offset, t.nbytes))  # empty tensors first where they share an offset
    position, previous = data_start, None
    for info in infos:
        where = f"'{info.name}' starts at data byte {info.offset - data_start}, expected {position - data_start}"
        if info.offset < position:
            raise HeaderError(path, f"corrupt header: tensors '{previous.name}' and '{info.name}' overlap ({where})")
        if info.offset > position:
            raise HeaderError(path, f"corrupt header: a gap before tensor '{info.name}' ({where})")
        position, previous = info.offset + info.nbytes, info
    if position != size:
        problem = "truncated, an unfinished download?" if position > size else "trailing bytes"
        raise HeaderError(path, f"{problem}: its tensors need {position - data_start} bytes of data after the "
                                f"header, the file holds {size - data_start}")
    return infos


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: str, name: str, entry: object, data_start: int) -> TensorInfo:
    def bad(problem: str) -> HeaderError:
        return HeaderError(path, f"tensor '{name}': {problem}")

    if not isinstance(entry, dict):
        raise bad("corrupt header entry (an object with dtype, shape, data_offsets expected)")
    dtype = entry.get("dtype")
    if dtype not in ITEMSIZE:
        raise bad(f"unknown dtype {dtype!r} (safetensors dtypes: {', '.join(ITEMSIZE)})")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise bad(f"corrupt shape {shape!r}")
    offsets = entry.get("data_offsets")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise bad(f"corrupt data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise bad(f"data_offsets span {end - begin} bytes but shape {shape} of {dtype} needs {nbytes}")
    return TensorInfo(path, name, dtype, tuple(shape), data_start + begin, nbytes)


def build_header(tensors: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The header of a file holding these (name, dtype, shape) tensors back to back, in this order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    position = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces (as the reference writer does) so the data starts 8-byte aligned.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def partial_path(path: Path) -> Path:
    """The temporary name a shard has until it is complete."""
    return path.with_name(f".{path.name}.partial")


def io_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer for direct I/O: a private anonymous map. mmap(-1) maps shared memory, whose
    pages cost the kernel more to fault in, pin for each direct read and free: a cold merge of 3 x 1.1B
    spent 1.5-1.7 s of system time with shared read slots, 1.1 s with private ones. (Huge pages, asked
    for with madvise, cost more: 2.7 s.)"""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def fsync_dir(path: Path) -> None:
    """Make a rename in this folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Streams one safetensors file under a temporary name, hashing every byte as it is written.

    The layout is fixed up front from the tensors' shapes, so data is plain sequential writes in header
    order. commit() checks the byte count, fsyncs and renames: a file with the final name is complete.
    Writes bypass the page cache where the filesystem allows (see merge/io/reader.py for why), through
    aligned staging buffers that a thread of their own writes out while the next fills: hashing and
    copying then overlap the disk's writes (one after the other, the writer was the merge's slowest
    stage). The last block is padded, then the file truncated to its size.
    """

    def __init__(self, path: Path, tensors: Sequence[tuple[str, str, tuple[int, ...]]]) -> None:
        self.path = Path(path)
        self.tmp_path = partial_path(self.path)
        header = build_header(tensors)
        self.expected = len(header) + sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in tensors)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._disk: ThreadPoolExecutor | None = None
        self._stage: mmap.mmap | None = None
        try:
            self._fd = os.open(self.tmp_path, flags | DIRECT) if DIRECT else os.open(self.tmp_path, flags)
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: no direct I/O on this filesystem
                raise
            self._fd = os.open(self.tmp_path, flags)
        else:
            if DIRECT:
                self._stage = io_buffer(STAGE_BYTES)
                self._disk = ThreadPoolExecutor(1, thread_name_prefix="merge-disk-write")
        self._spare: list[mmap.mmap] = []
        self._writing: deque[tuple[Future, mmap.mmap]] = deque()  # stages handed to the disk thread, in order
        self._staged = 0
        self._sha = hashlib.sha256()
        self._written = 0
        self.write(header)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._written + len(view) > self.expected:
            raise RuntimeError(f"{self.path.name}: more data than its header announces")
        self._sha.update(view)
        self._written += len(view)
        if self._stage is None:
            _write_all(self._fd, view)
            return
        while view:
            n = min(len(view), STAGE_BYTES - self._staged)
            self._stage[self._staged : self._staged + n] = view[:n]
            self._staged += n
            view = view[n:]
            if self._staged == STAGE_BYTES:
                self._hand_over(STAGE_BYTES)

    def _hand_over(self, nbytes: int) -> None:
        """Queue the stage's first nbytes (a multiple of ALIGN) for the disk thread; fill another."""
        assert self._stage is not None and self._disk is not None
        self._writing.append((self._disk.submit(self._write_stage, self._stage, nbytes), self._stage))
        self._staged = 0
        if self._spare:
            self._stage = self._spare.pop()
        elif len(self._writing) < WRITE_STAGES:
            self._stage = io_buffer(STAGE_BYTES)
        else:
            done, self._stage = self._writing.popleft()
            done.result()  # its error (a full disk) surfaces here

    def _write_stage(self, stage: mmap.mmap, nbytes: int) -> None:
        """On the disk thread: write a stage at the file's end."""
        with memoryview(stage) as staged:
            done = 0
            while done < nbytes:
                try:
                    done += os.write(self._fd, staged[done:nbytes])
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    # The filesystem took O_DIRECT at open but refuses the write: on through the cache,
                    # under the same descriptor number (sync() may be using it on the writer's thread).
                    position = os.lseek(self._fd, 0, os.SEEK_CUR)
                    buffered = os.open(self.tmp_path, os.O_WRONLY)
                    os.dup2(buffered, self._fd)
                    os.close(buffered)
                    os.lseek(self._fd, position, os.SEEK_SET)

    def _drain(self) -> None:
        """Wait for every stage handed to the disk thread; raises the first error."""
        while self._writing:
            done, stage = self._writing.popleft()
            self._spare.append(stage)
            done.result()

    def sync(self) -> None:
        """Flush what was written so far to disk; called periodically so the final fsync is short."""
        os.fdatasync(self._fd)

    def commit(self) -> tuple[str, int]:
        """Finish the file; returns its sha256 and size."""
        if self._written != self.expected:
            raise RuntimeError(f"{self.path.name}: {self._written} bytes written, {self.expected} expected")
        if self._stage is not None and self._staged:
            padded = -(-self._staged // ALIGN) * ALIGN
            self._stage[self._staged : padded] = bytes(padded - self._staged)
            self._hand_over(padded)
        self._drain()
        os.ftruncate(self._fd, self._written)
        os.fsync(self._fd)
        self._close()
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return self._sha.hexdigest(), self._written

    def abort(self) -> None:
        self._close()
        self.tmp_path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._disk is not None:
            self._disk.shutdown(wait=True, cancel_futures=True)  # no write may land after the close
            self._disk = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for stage in (self._stage, *self._spare, *(stage for _, stage in self._writing)):
            # BufferError: a failed write's traceback still holds a view of it; the GC unmaps it later.
            with contextlib.suppress(BufferError):
                if stage is not None:
                    stage.close()
        self._stage, self._spare = None, []
        self._writing.clear()


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def file_sha256(path: Path, block: int = 16 << 20) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(block)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()
