"""The merge manifest: what lets a rerun resume and `calm merge --verify` re-check a finished merge.

It is written before the first shard (a fingerprint of config and inputs, and the weights, so a resumed
merge reuses them rather than recomputing losses), rewritten atomically whenever a shard completes (its
sha256 and size), and marked complete just before the index, the last file, is written. Its JSON is
deterministic, so an interrupted-then-resumed merge is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from merge.io.checkpoint_folder import INDEX_FILE, Checkpoint
from merge.io.safetensors_file import file_sha256, fsync_dir, read_header
from merge.merge_errors import OutputError

MANIFEST = "merge_manifest.json"
FORMAT = "calm-merge-manifest/1"


@dataclass
class Manifest:
    fingerprint: str
    weights: list[float]
    losses: list[float] | None
    shards: list[str]  # every shard of the plan, in order
    done: dict[str, dict[str, int | str]] = field(default_factory=dict)  # shard -> sha256, bytes
    files: dict[str, str] = field(default_factory=dict)  # other written files -> sha256
    complete: bool = False

    def save(self, out: Path) -> None:
        write_atomic(out / MANIFEST, _dump({"format": FORMAT, **asdict(self)}))

    @classmethod
    def load(cls, out: Path) -> Manifest | None:
        path = out / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.pop("format") != FORMAT:
                raise ValueError("unknown format")
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise OutputError(f"{path}: unreadable merge manifest ({err})") from err


def _dump(data: object) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace a file in one step: a crash leaves the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fingerprint(settings: dict, checkpoints: list[Checkpoint], extra_files: list[Path]) -> str:
    """Identifies a merge: the settings that shape the output bytes, and the inputs as they are now
    (each file's size, modification time and tensor layout; hashing 100s of GB of inputs would cost
    as much as the merge). Execution settings (workers, memory budget, Ray) are left out on purpose:
    they do not change the output, so a resume may use others."""
    inputs = []
    for ckpt in checkpoints:
        files = sorted({t.path for t in ckpt.tensors.values()})
        for path in files:
            stat = os.stat(path)
            inputs.append([path, stat.st_size, stat.st_mtime_ns])
        inputs.append([[t.name, t.path, t.dtype, list(t.shape), t.offset] for t in ckpt.tensors.values()])
    extra = [[str(p), file_sha256(p)] for p in extra_files]
    return hashlib.sha256(_dump({"settings": settings, "inputs": inputs, "extra": extra})).hexdigest()


def index_bytes(out: Path, shards: list[str]) -> bytes:
    """The index of a sharded output, from the shards' own headers (so --verify can rebuild it)."""
    weight_map = {}
    total = 0
    for name in shards:
        for info in read_header(out / name):
            weight_map[info.name] = name
            total += info.nbytes
    return _dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def pending_shards(out: Path, manifest: Manifest) -> list[str]:
    """Shards still to compute. A shard is kept only if the manifest has its hash and the file on disk
    matches it; anything else (a partial file, a shard renamed just before a crash) is removed."""
    for stale in out.glob(".*.partial"):
        stale.unlink()
    todo = []
    for name in manifest.shards:
        path = out / name
        record = manifest.done.get(name)
        if record and path.exists() and path.stat().st_size == record["bytes"] and file_sha256(path) == record["sha256"]:
            continue
        manifest.done.pop(name, None)
        path.unlink(missing_ok=True)
        todo.append(name)
    return todo


def verify(out: Path) -> list[str]:
    """Every problem found in a finished merge; an empty list means it checks out."""
    manifest = Manifest.load(out)
    if manifest is None:
        raise OutputError(f"{out}: no {MANIFEST}; not the output of calm merge")
    problems = []
    if not manifest.complete:
        problems.append(f"incomplete: {len(manifest.done)} of {len(manifest.shards)} shards done")
    for name in manifest.shards:
        record = manifest.done.get(name)
        path = out / name
        if record is None:
            if manifest.complete:
                problems.append(f"{name}: not recorded in the manifest")
            continue
        if not path.exists():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {record['bytes']}")
        elif file_sha256(path) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    for name, sha in sorted(manifest.files.items()):
        if not (out / name).exists():
            problems.append(f"{name}: missing")
        elif file_sha256(out / name) != sha:
            problems.append(f"{name}: sha256 differs from the manifest")
    if manifest.complete and len(manifest.shards) > 1 and not problems:
        index = out / INDEX_FILE
        if not index.exists():
            problems.append(f"{INDEX_FILE}: missing")
        elif index.read_bytes() != index_bytes(out, manifest.shards):
            problems.append(f"{INDEX_FILE}: does not match the shards' headers")
    problems += [f"{p.name}: leftover partial file" for p in sorted(out.glob(".*.partial"))]
    if manifest.complete and not problems:
        from merge.io.report import unaccounted  # the report module plans; verifying hashes needs none of it

        problems += unaccounted(out, manifest.shards)
    return problems
