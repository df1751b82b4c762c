"""Safetensors files read and written by hand: strict header validation, memory-mapped views of any
element range, and a streaming writer whose header is fixed before the first data byte.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and data_offsets of
each tensor, relative to the end of the header) and raw little-endian bytes. Handling it directly lets a
merge read one chunk of a 1B-element embedding without materialising the tensor, and write a shard
whose tensors arrive chunk by chunk, which the safetensors library's whole-dict API cannot do.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge.errors import CheckpointError

# The reference implementation's bound: a longer header means a corrupt length field, not a real file.
MAX_HEADER_BYTES = 100_000_000

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
ITEMSIZE: dict[str, int] = {code: torch.empty((), dtype=dt).element_size() for code, dt in TORCH_DTYPES.items()}
PAGE = mmap.PAGESIZE
ADVISE_STEP = 4 * 2**20


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
    """Parse and validate a safetensors header; tensors come back in file order.

    Every check that a loader would trip over later is done here, so a corrupt or truncated file is
    named before any output exists.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)"
                )
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file: the header claims {length} bytes "
                    f"but {size - 8} follow"
                )
            raw = f.read(length)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt header: not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header: a JSON object was expected")
    infos = [
        _parse_entry(path, name, entry, 8 + length, size)
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    infos.sort(key=lambda t: t.offset)
    for prev, cur in itertools.pairwise(infos):
        if cur.offset < prev.offset + prev.nbytes:
            raise CheckpointError(f"{path}: corrupt header: tensors '{prev.name}' and '{cur.name}' overlap")
    return infos


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: str, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: corrupt header entry (an object with dtype, shape, data_offsets expected)")
    dtype = entry.get("dtype")
    if dtype not in TORCH_DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(TORCH_DTYPES)})")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{where}: corrupt shape {shape!r}")
    offsets = entry.get("data_offsets")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: corrupt data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} needs {nbytes}")
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated: tensor '{name}' ends at byte {data_start + end} but the file has {size} bytes")
    return TensorInfo(path, name, dtype, tuple(shape), data_start + begin, nbytes)


class MappedFile:
    """A memory map of one input file; views share its pages, so nothing is read until it is used."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        # A private mapping rather than ACCESS_READ because torch.frombuffer wants a writable buffer;
        # nothing writes to it, so no page is ever copied and the pages stay file-backed.
        self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)

    def view(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, without copying. The range must be non-empty."""
        return torch.frombuffer(
            self._mm, dtype=TORCH_DTYPES[info.dtype], count=stop - start, offset=info.offset + start * ITEMSIZE[info.dtype]
        )

    def touch(self, offset: int, length: int) -> None:
        """Fault in the pages of a byte range (reading them from disk if needed), one byte per page.
        A torch op does the reading, so the GIL is released while the disk works."""
        if length > 0:
            begin = offset - offset % PAGE
            torch.frombuffer(self._mm, dtype=torch.uint8, count=offset + length - begin, offset=begin)[::PAGE].max()

    def advise(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading a byte range into the page cache, without waiting or mapping
        it. Each call reads at most the device's read-ahead size, hence the steps."""
        for start in range(offset, offset + length, ADVISE_STEP):
            os.posix_fadvise(self._fd, start, min(ADVISE_STEP, offset + length - start), os.POSIX_FADV_WILLNEED)

    def release(self, offset: int, length: int) -> None:
        """Unmap the whole pages of a consumed byte range, so resident memory does not grow with the file.

        The page cache keeps the data; only this process's mapping of it goes.
        """
        begin = -(-offset // PAGE) * PAGE
        end = (offset + length) // PAGE * PAGE
        if end > begin:
            self._mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def close(self) -> None:
        try:
            self._mm.close()  # BufferError while a view is still referenced: the descriptor goes anyway
        finally:
            os.close(self._fd)


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
    """

    def __init__(self, path: Path, tensors: Sequence[tuple[str, str, tuple[int, ...]]]) -> None:
        self.path = Path(path)
        self.tmp_path = partial_path(self.path)
        header = build_header(tensors)
        self.expected = len(header) + sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in tensors)
        self._file = open(self.tmp_path, "wb", buffering=0)  # noqa: SIM115 - closed by commit/abort
        self._sha = hashlib.sha256()
        self._written = 0
        self.write(header)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._written + len(view) > self.expected:
            raise RuntimeError(f"{self.path.name}: more data than its header announces")
        self._sha.update(view)
        self._written += len(view)
        while view:
            view = view[self._file.write(view):]

    def sync(self) -> None:
        """Flush what was written so far to disk; called periodically so the final fsync is short."""
        os.fdatasync(self._file.fileno())

    def commit(self) -> tuple[str, int]:
        """Finish the file; returns its sha256 and size."""
        if self._written != self.expected:
            raise RuntimeError(f"{self.path.name}: {self._written} bytes written, {self.expected} expected")
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return self._sha.hexdigest(), self._written

    def abort(self) -> None:
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (numpy has no bfloat16, so go via uint8)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def file_sha256(path: Path, block: int = 16 << 20) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(block)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()
