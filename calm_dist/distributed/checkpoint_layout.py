"""What a training checkpoint folder holds and when it is complete, without DeepSpeed or Ray.

Each rank writes its own files (DeepSpeed's shards), then RANKS/<rank>.json listing them with their
sizes; rank 0 also writes STATE (step, data position, world size). Ray Train copies every rank's
files into one checkpoint folder in no particular order, so a folder is complete only when all
world_size lists are there and every file they name has its full size.

Folders are read through a pyarrow filesystem: the local one by default, or the one a run's storage
URI names (S3, GCS, ...). One listing gives every file's size; then only the small JSON files are read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

STATE = "training_state.json"
RANKS = "ranks"
# Beside its tag folder (step-NNNNNNNN/, see training_state), DeepSpeed writes a pointer to the tag and
# its conversion scripts.
_DEEPSPEED_FILES = {"latest", "zero_to_fp32.py", "zero_to_torch.py"}
_TAG_FILE = re.compile(r"step-\d{8}/[^/]+")
_MANIFEST = re.compile(rf"{RANKS}/(\d+)\.json")


def write_rank_manifest(directory: str | Path, rank: int) -> None:
    """List the files this rank wrote into its own checkpoint directory, with their sizes."""
    directory = Path(directory)
    files = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}
    (directory / RANKS).mkdir(exist_ok=True)
    (directory / RANKS / f"{rank}.json").write_text(json.dumps(files))


def read_json(path: str | Path, filesystem: pyarrow.fs.FileSystem | None = None):
    """A JSON file on `filesystem` (default: this machine's). OSError or ValueError when it cannot be read."""
    filesystem, path = _on(filesystem, path)
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def checkpoint_step(directory: str | Path, filesystem: pyarrow.fs.FileSystem | None = None) -> int:
    """The step a checkpoint folder was saved at."""
    return int(read_json(f"{directory}/{STATE}", filesystem)["step"])


@dataclass(frozen=True)
class Inspection:
    """What a checkpoint folder holds. step: set when it is complete. Otherwise problem says why not, and
    cut_short whether that is only what an interrupted copy leaves (files missing, or shorter than their
    rank listed them). foreign: files no checkpoint of ours holds."""

    step: int | None = None
    problem: str | None = None
    cut_short: bool = False
    foreign: tuple[str, ...] = ()


def inspect_checkpoint(folder: str | Path, filesystem: pyarrow.fs.FileSystem | None = None) -> Inspection:
    """What `folder` holds; a folder that cannot be read says so in the problem rather than raising."""
    filesystem, folder = _on(filesystem, folder)
    try:
        sizes = _sizes(filesystem, folder)
        manifests = {int(m[1]): read_json(f"{folder}/{name}", filesystem)
                     for name in sizes if (m := _MANIFEST.fullmatch(name))}
        state = read_json(f"{folder}/{STATE}", filesystem) if STATE in sizes else None
    except (OSError, ValueError) as err:  # no access, storage failing, a JSON file cut mid-write
        return Inspection(problem=f"cannot be read: {err}")
    listed = {name for files in manifests.values() if isinstance(files, dict) for name in files}
    foreign = tuple(sorted(name for name in sizes if not _ours(name, listed)))
    try:
        world_size = int(state["world_size"]) if state is not None else None
        step = int(state["step"]) if state is not None else None
        missing = [] if state is not None else [STATE]
        missing += [f"{RANKS}/{rank}.json" for rank in range(world_size or 0) if rank not in manifests]
        short, larger = [], []
        for rank, files in sorted(manifests.items()):
            if world_size is not None and rank >= world_size:
                larger.append(f"{RANKS}/{rank}.json (world size {world_size})")
            for name, size in files.items():
                have = sizes.get(name)
                if have is None:
                    missing.append(name)
                elif have != size:
                    (short if have < size else larger).append(f"{name} ({have} of {int(size)} bytes)")
    except (KeyError, TypeError, ValueError, AttributeError):
        return Inspection(problem=f"not a checkpoint this version writes ({STATE} or {RANKS}/ differ)",
                          foreign=foreign)
    if larger:
        return Inspection(problem=f"does not match its ranks' lists: {_some(larger)}", foreign=foreign)
    if missing or short:
        parts = ([f"missing {_some(missing)}"] if missing else []) + ([f"cut short: {_some(short)}"] if short else [])
        return Inspection(problem="incomplete: " + "; ".join(parts), cut_short=True, foreign=foreign)
    return Inspection(step=step, foreign=foreign)


def complete_step(folder: str | Path, filesystem: pyarrow.fs.FileSystem | None = None) -> int | None:
    """The checkpoint's step if every rank's files are in `folder` at their full size, else None."""
    return inspect_checkpoint(folder, filesystem).step


def _on(filesystem: pyarrow.fs.FileSystem | None, path: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    if filesystem is None:
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    return filesystem, str(path).rstrip("/")


def _sizes(filesystem: pyarrow.fs.FileSystem, folder: str) -> dict[str, int]:
    """Every file below `folder`, by its path relative to it, with its size."""
    selector = pyarrow.fs.FileSelector(folder, recursive=True, allow_not_found=True)
    return {info.path[len(folder) + 1:]: info.size for info in filesystem.get_file_info(selector)
            if info.type == pyarrow.fs.FileType.File}


def _ours(name: str, listed: set[str]) -> bool:
    """Whether a checkpoint of ours holds a file of this name (a rank that has not finished copying has
    not listed its files yet, but they are DeepSpeed's, in the tag folder)."""
    return (name in listed or name == STATE or name in _DEEPSPEED_FILES or bool(_MANIFEST.fullmatch(name))
            or bool(_TAG_FILE.fullmatch(name)))


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
