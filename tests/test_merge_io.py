"""The merge's file I/O: chunk reads (direct where the filesystem allows, else through the page cache)
and the shard writer (direct through an aligned staging buffer, else buffered) give exactly the bytes
of the files, at any offset and length, and fail with the file's name."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_fixtures import BIG_SHAPES, budget_for_blocks, folder_bytes, random_tensors, raw_checkpoint

from merge.io import reader
from merge.io import safetensors_file as safetensors_io
from merge.io.reader import ALIGN, Chunk, InputFile, InputFiles, slot_bytes
from merge.io.safetensors_file import ITEMSIZE, ShardWriter, TensorInfo
from merge.job import run_merge
from merge.merge_config import validate_config
from merge.merge_errors import CheckpointError, OutputError


def direct_io_here(folder) -> bool:
    probe = folder / "probe"
    probe.write_bytes(bytes(ALIGN))
    try:
        return InputFile(str(probe))._direct is not None
    finally:
        probe.unlink()


@pytest.fixture(params=["direct", "buffered"])
def io_mode(request, monkeypatch, tmp_path):
    """Each test once as this filesystem does it (direct, on ext4 or xfs) and once as on tmpfs."""
    if request.param == "buffered":
        monkeypatch.setattr(reader, "DIRECT", 0)
        monkeypatch.setattr(safetensors_io, "DIRECT", 0)
    elif not direct_io_here(tmp_path):
        pytest.skip("this filesystem does no direct I/O")
    return request.param


def view(files: InputFiles, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    slot, offset = files.locate(info, start)
    return torch.frombuffer(slot, dtype=torch.uint8, count=(stop - start) * ITEMSIZE[info.dtype], offset=offset)


def test_chunks_read_the_file_bytes_at_any_offset(tmp_path, io_mode):
    data = torch.randint(0, 256, (3 * ALIGN * 5 + 1000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path = tmp_path / "input.bin"
    path.write_bytes(data.numpy().tobytes())
    # Tensors at offsets that are not block-aligned; the last ends at the end of the file.
    infos = [TensorInfo(str(path), "a", "BF16", (5000,), 1000, 10000), TensorInfo(str(path), "b", "F32", (4000,), len(data) - 16000, 16000)]
    chunks = [
        Chunk((info,), start, stop, cached)
        for cached in (False, True)
        for info, start, stop in [(infos[0], 0, 5000), (infos[0], 17, 2049), (infos[1], 3001, 4000), (infos[1], 0, 1)]
    ]
    files = InputFiles(chunks, max(slot_bytes(infos, 5000), slot_bytes(infos[1:], 4000)), slots=3)
    try:
        for chunk in chunks:
            (info,), start, stop, _ = chunk
            with files.reading(chunk):
                got = view(files, info, start, stop)
                inner = view(files, info, start + (stop - start) // 2, stop)
                itemsize = ITEMSIZE[info.dtype]
                expected = data[info.offset + start * itemsize : info.offset + stop * itemsize]
                assert torch.equal(got, expected)
                assert torch.equal(inner, expected[len(expected) - len(inner) :])
    finally:
        files.close()


def test_reading_runs_ahead_by_the_slots_and_only_in_the_planned_order(tmp_path):
    path = tmp_path / "input.bin"
    path.write_bytes(bytes(range(256)) * 64)
    info = TensorInfo(str(path), "a", "U8", (16384,), 0, 16384)
    chunks = [Chunk((info,), start, start + 1024) for start in range(0, 16384, 1024)]
    started: list[int] = []
    files = InputFiles(chunks, slot_bytes([info], 1024), slots=5)
    real_start = files._start

    def start(chunk, slot):
        started.append(chunk.start)
        return real_start(chunk, slot)

    files._start = start
    try:
        # Constructed: the first 5 chunks are being read (by the real _start, before the wrapper).
        assert len(files._queue) == 5 and len(files._slots) == 5
        with pytest.raises(RuntimeError, match="out of the planned order"), files.reading(chunks[1]):
            pass
        for i, chunk in enumerate(chunks):
            with files.reading(chunk):
                assert bytes(view(files, info, chunk.start, chunk.stop)) == (bytes(range(256)) * 4)
            # Each finished chunk frees its slot for the chunk 5 further on, and no more slots are made.
            assert started == [c.start for c in chunks[5 : min(i + 6, len(chunks))]]
            assert len(files._slots) == 5
    finally:
        files.close()


def test_small_chunks_share_a_slot_so_reading_runs_ahead_by_bytes(tmp_path, io_mode):
    """A norm's chunk is a few KB: with one slot per chunk, 10 slots of 96 MB held 400 MB of a Llama's
    first chunks and the disk sat idle while torch loaded."""
    data = torch.randint(0, 256, (64 * 1024,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    path = tmp_path / "input.bin"
    path.write_bytes(data.numpy().tobytes())
    info = TensorInfo(str(path), "a", "U8", (len(data),), 0, len(data))
    chunks = [Chunk((info,), start, start + 100) for start in range(0, 64 * 1024 - 100, 1000)]
    room = slot_bytes([info], 100)
    files = InputFiles(chunks, 8 * room, slots=2)
    try:
        # 16 chunks fit the two slots: all are being read before the first is computed.
        assert len(files._queue) == 16 and len(files._slots) == 2
        for chunk in chunks:
            with files.reading(chunk):
                assert torch.equal(view(files, info, chunk.start, chunk.stop), data[chunk.start : chunk.stop])
                assert len(files._slots) == 2
                assert sum(t.chunk == chunk for t in files._queue) == 0
            # A slot is reused only once every chunk in it is computed: the queue stays in 2 slots.
            assert sum(slot.used for slot in files._slots) <= 2 * 8 * room
    finally:
        files.close()


def test_a_file_truncated_while_merging_is_named(tmp_path, io_mode):
    path = tmp_path / "input.bin"
    path.write_bytes(bytes(20000))
    info = TensorInfo(str(path), "a", "F32", (4000,), 4000, 16000)
    os.truncate(path, 12000)
    chunk = Chunk((info,), 0, 4000)
    files = InputFiles([chunk], slot_bytes([info], 4000))
    try:
        with pytest.raises(CheckpointError, match=f"{path}: truncated while merging"), files.reading(chunk):
            pass
    finally:
        files.close()


def test_one_dtype_table_for_every_reader():
    """ITEMSIZE sizes every safetensors dtype (the training preflight reads with it too); a merge computes
    in those merge.execution.stream maps to torch, whose sizes agree."""
    from merge.execution.stream import TORCH_DTYPES
    from merge.io.safetensors_file import MERGE_CODES

    assert set(TORCH_DTYPES) == set(MERGE_CODES) <= set(ITEMSIZE)
    assert all(ITEMSIZE[code] == dtype.itemsize for code, dtype in TORCH_DTYPES.items())
    assert {"F8_E4M3", "F8_E5M2", "U16", "U32", "U64"} <= set(ITEMSIZE) - set(MERGE_CODES)


@pytest.mark.parametrize("pieces", [[10, 5000, 3, 70000, 1], [4096, 4096], [1]])
def test_shard_writer_writes_exactly_its_bytes(tmp_path, io_mode, monkeypatch, pieces):
    monkeypatch.setattr(safetensors_io, "STAGE_BYTES", 2 * ALIGN)  # several stagings per write
    blob = os.urandom(sum(pieces))
    writer = ShardWriter(tmp_path / "out.safetensors", [("x", "U8", (len(blob),))])
    header = safetensors_io.build_header([("x", "U8", (len(blob),))])
    position = 0
    for n in pieces:
        writer.write(blob[position : position + n])
        position += n
    sha, size = writer.commit()
    written = (tmp_path / "out.safetensors").read_bytes()
    assert written == header + blob and size == len(written)
    assert sha == hashlib.sha256(written).hexdigest()
    assert not (tmp_path / ".out.safetensors.partial").exists()


def test_a_filesystem_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch):
    if not direct_io_here(tmp_path):
        pytest.skip("this filesystem does no direct I/O")
    monkeypatch.setattr(safetensors_io, "STAGE_BYTES", 2 * ALIGN)
    real_write, refused = os.write, []

    def write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & safetensors_io.DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    blob = os.urandom(5 * ALIGN + 123)
    writer = ShardWriter(tmp_path / "out.safetensors", [("x", "U8", (len(blob),))])
    writer.write(blob)
    writer.commit()
    assert refused
    assert (tmp_path / "out.safetensors").read_bytes() == safetensors_io.build_header([("x", "U8", (len(blob),))]) + blob


def test_a_disk_that_fills_mid_merge_is_one_clear_error_and_leaves_no_shard(tmp_path, io_mode, monkeypatch):
    """A write fails on the writer's disk thread (direct) or in the writer itself (buffered): either way
    the merge stops with the output's name and the reason, and no shard under its final name."""
    root = tmp_path / "in"
    for seed in range(2):
        raw_checkpoint(root / f"m{seed}", random_tensors(seed, BIG_SHAPES), shards=2)
    out = tmp_path / "out"
    cfg = validate_config({"method": "linear", "models": [{"path": str(root / f"m{k}")} for k in range(2)],
                           "output": {"path": str(out)}})
    monkeypatch.setattr(safetensors_io, "STAGE_BYTES", 2 * ALIGN)  # several stages, several writes
    real_write, shard_writes = os.write, []

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            shard_writes.append(fd)
            if len(shard_writes) > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OutputError, match=r"\.safetensors: cannot write: No space left on device"):
        run_merge(cfg, show_progress=False, log=lambda _: None)
    # It stops there: at most the stages already handed to the disk thread are tried after the failure.
    assert 4 <= len(shard_writes) <= 4 + safetensors_io.WRITE_STAGES
    assert not [p.name for p in out.iterdir() if p.name.endswith(".safetensors")]


def test_merge_output_is_the_same_either_way(tmp_path, monkeypatch):
    root = tmp_path / "in"
    for seed in range(2):
        raw_checkpoint(root / f"m{seed}", random_tensors(seed, BIG_SHAPES), shards=2)

    def merged(name: str) -> dict[str, bytes]:
        cfg = validate_config({
            "method": "linear", "models": [{"path": str(root / f"m{k}")} for k in range(2)],
            "output": {"path": str(tmp_path / name)},
        })
        run_merge(cfg, show_progress=False, log=lambda _: None)
        return folder_bytes(tmp_path / name)

    direct = merged("direct")
    monkeypatch.setattr(reader, "DIRECT", 0)
    monkeypatch.setattr(safetensors_io, "DIRECT", 0)
    assert merged("buffered") == direct


def test_a_tensor_of_one_chunk_is_read_once_for_every_pass_of_its_method(tmp_path, monkeypatch):
    """TIES reads its inputs three times (two threshold passes, then the merge). A tensor that fits one
    chunk is read once, directly, and held; one of several chunks is read per pass, through the page
    cache. Either way the output is the one a single chunk per tensor gives."""
    root = tmp_path / "in"
    for seed in range(3):
        raw_checkpoint(root / f"m{seed}", random_tensors(seed, BIG_SHAPES), shards=1)

    def merged(name: str, blocks: int) -> dict[str, bytes]:
        cfg = validate_config({
            "method": "ties", "models": [{"path": str(root / f"m{k}")} for k in range(3)], "base_model": "m0",
            "parameters": {"density": 0.5}, "output": {"path": str(tmp_path / name)},
            "memory_budget": budget_for_blocks(blocks, 18),  # bf16: 3 x 2 bytes out, 2 x 3 x 2 in
        })
        run_merge(cfg, show_progress=False, log=lambda _: None)
        return folder_bytes(tmp_path / name)

    whole = merged("whole", 8)
    reads: list[tuple[str, int, bool]] = []
    start = InputFiles._start

    def record(self, chunk, slot):
        reads.append((chunk.sources[0].name, chunk.start, chunk.cached))
        return start(self, chunk, slot)

    monkeypatch.setattr(InputFiles, "_start", record)
    assert merged("chunked", 2) == whole
    embed = [r for r in reads if r[0] == "embed.weight"]
    assert len(embed) == 3 * 2 and all(cached for _, _, cached in embed)  # 700,000 elements: 2 chunks
    assert [r for r in reads if r[0] == "layer.weight"] == [("layer.weight", 0, False)]  # 300,000: 1 chunk


def test_shards_in_one_process_read_the_next_shard_before_committing_this_one(tmp_path, monkeypatch):
    """workers: 1 runs the shards in turn through shared buffers; the next shard's first chunk is
    already being read when this shard is synced and committed, and the bytes are those of one shard
    per process (workers: 2)."""
    root = tmp_path / "in"
    for seed in range(2):
        raw_checkpoint(root / f"m{seed}", random_tensors(seed, BIG_SHAPES), shards=2)

    def config(name: str, workers: int):
        return validate_config({
            "method": "linear", "models": [{"path": str(root / f"m{k}")} for k in range(2)],
            "output": {"path": str(tmp_path / name), "max_shard_size": "1MB"}, "workers": workers,
        })

    pooled = config("pooled", 2)
    run_merge(pooled, show_progress=False, log=lambda _: None)

    events: list[tuple[str, str]] = []
    start, commit = InputFiles._start, ShardWriter.commit

    def record_start(self, chunk, slot):
        if chunk.start == 0:
            events.append(("read", chunk.sources[0].name))
        return start(self, chunk, slot)

    def record_commit(self):
        events.append(("commit", self.path.name))
        return commit(self)

    monkeypatch.setattr(InputFiles, "_start", record_start)
    monkeypatch.setattr(ShardWriter, "commit", record_commit)
    run_merge(config("sequential", 1), show_progress=False, log=lambda _: None)

    assert folder_bytes(tmp_path / "sequential") == folder_bytes(tmp_path / "pooled")
    index = json.loads((tmp_path / "sequential" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) >= 2
    commits = [i for i, (kind, _) in enumerate(events) if kind == "commit"]
    for before, after in itertools.pairwise(shards):
        first = min((name for name, shard in index.items() if shard == after),
                    key=lambda name: events.index(("read", name)))
        assert events.index(("read", first)) < commits[shards.index(before)], (before, after, events)


def test_calm_merge_reads_its_inputs_while_torch_loads(tmp_path):
    """Checking and planning a merge need no torch, so the inputs are being read before torch begins
    to load (a second or more of every run): reader threads exist at torch's first import."""
    root = tmp_path / "in"
    for seed in range(2):
        raw_checkpoint(root / f"m{seed}", random_tensors(seed, BIG_SHAPES))
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({"method": "linear", "models": [{"path": str(root / f"m{k}")} for k in range(2)],
                                  "output": {"path": str(tmp_path / "out")}}))
    watch = f"""
import importlib.abc, sys, threading
readers = []
class FirstTorchImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not readers:
            readers.append(sum(t.name.startswith("merge-read") for t in threading.enumerate()))
sys.meta_path.insert(0, FirstTorchImport())
from launcher.cli import main
try:
    main(["merge", {str(config)!r}, "--no-progress"])
finally:
    print("reader threads at torch's import:", readers)
"""
    done = subprocess.run([sys.executable, "-c", watch], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    readers = json.loads(done.stdout.strip().splitlines()[-1].split(":", 1)[1])
    assert readers and readers[0] > 0, done.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()
