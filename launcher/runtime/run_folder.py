"""A run's checkpoints on its storage: which are complete and newest, what a start continues from, and
what failed or restarted attempts left.

The storage (`ray.storage_path`) is a local folder or a URI (s3://bucket/runs, gs://..., any scheme
pyarrow knows, with its query: `?endpoint_override=...`). Ray Train writes there through the pyarrow
filesystem the URI names, and everything here reads and deletes through the same one, so every node
and the driver see the same checkpoints.

Decisions go by checkpoints, not by folders: a run folder left by an attempt that failed before its
first checkpoint is no run to resume (and no obstacle to a fresh start), and the newest checkpoint is
the highest step among the complete ones, whatever their modification times or what Ray Train's
own snapshot registered (a driver killed between a checkpoint's upload and its registration leaves
the snapshot one checkpoint behind).

Nothing the user made is deleted. A checkpoint folder that cannot be read, or that is not provably
ours, stops a start with a message naming it (CheckpointError, exit 2), and `--resume` deletes nothing.
Only folders an attempt of ours provably left are removed: named as Ray Train names its checkpoints,
holding nothing but a checkpoint's files, never registered by Ray Train, and either cut short (before
a fresh start) or cut short or superseded (after a run).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit, urlunsplit

import pyarrow.fs

from calm_dist.distributed.checkpoint_layout import STATE, Inspection, inspect_checkpoint, read_json
from calm_dist.errors import InputError
from launcher.train_config import ConfigError

# Ray Train's names for its checkpoint folders and its record of the checkpoints it registered.
CHECKPOINT_PREFIX = "checkpoint_"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# As Ray Train names a checkpoint folder (StorageContext.make_default_checkpoint_dir_name): the time to the
# microsecond. A folder named otherwise is never taken for one of ours.
_RAY_CHECKPOINT_NAME = re.compile(r"checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d{6}")


class CheckpointError(InputError):
    """The run's checkpoints do not allow the start asked for (one cannot be read, or is not provably
    ours to remove). Nothing was deleted."""


@dataclass(frozen=True)
class RunStorage:
    """A run's folder on its storage: `path` on `filesystem`."""

    filesystem: pyarrow.fs.FileSystem
    path: str
    ray_storage_path: str  # what Ray Train's RunConfig(storage_path=...) gets: a local folder, or the URI given
    uri: SplitResult | None = None  # the run folder's URI, query included; None for a local folder

    def show(self, folder: str = "") -> Path | str:
        """The run's folder (or a folder in it), for messages: a local Path, or scheme://bucket/path
        without the query or credentials."""
        if self.uri is None:
            return Path(self.path, folder)
        host = self.uri.netloc.rpartition("@")[2]
        return f"{self.uri.scheme}://{host}{self.uri.path}" + (f"/{folder}" if folder else "")

    def source(self, folder: str) -> str:
        """What ray.train.Checkpoint opens for a folder of the run: its local path, or its URI with the
        storage's query (the endpoint, say)."""
        if self.uri is None:
            return str(Path(self.path, folder))
        return urlunsplit(self.uri._replace(path=f"{self.uri.path}/{folder}"))


def open_run_storage(storage_path: str, name: str) -> RunStorage:
    """The folder of run `name` under `storage_path` (a local folder, or a URI left as written)."""
    if "://" not in storage_path:
        root = str(Path(storage_path).resolve())
        return RunStorage(pyarrow.fs.LocalFileSystem(), f"{root}/{name}", root)
    uri = urlsplit(storage_path)
    shown = f"{uri.scheme}://{uri.netloc.rpartition('@')[2]}{uri.path}"
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    except (OSError, ValueError, NotImplementedError) as err:
        raise ConfigError(f"ray.storage_path: cannot open {shown}: {err}") from None
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):  # file:///...
        return RunStorage(filesystem, f"{root.rstrip('/')}/{name}", root)
    run_uri = uri._replace(path=f"{uri.path.rstrip('/')}/{name}", fragment="")
    return RunStorage(filesystem, f"{root.rstrip('/')}/{name}", storage_path, run_uri)


def _storage(run_storage: RunStorage | str | Path) -> RunStorage:
    """A RunStorage as given, or one for a local run folder."""
    if isinstance(run_storage, RunStorage):
        return run_storage
    path = os.path.abspath(run_storage)
    return RunStorage(pyarrow.fs.LocalFileSystem(), path, os.path.dirname(path))


@dataclass(frozen=True)
class FoundCheckpoint:
    path: Path | str  # the folder, as RunStorage.show gives it
    step: int
    source: str  # what ray.train.Checkpoint opens
    folder: str  # its name in the run's folder


@dataclass(frozen=True)
class Survey:
    """Every checkpoint folder of a run, sorted out."""

    complete: list[FoundCheckpoint]  # oldest step first
    leftovers: list[str]  # uploads of ours cut short, never registered: folder names
    unusable: list[str]  # "FOLDER: why", for messages; never deleted
    registered: set[str] | None  # the folders Ray Train's snapshot lists; None when it cannot be read
    snapshot: bool  # whether Ray Train's snapshot exists


def survey(run_storage: RunStorage | str | Path) -> Survey:
    storage = _storage(run_storage)
    snapshot = _exists(storage, RAY_SNAPSHOT)
    registered = registered_checkpoints(storage) if snapshot else set()
    complete, leftovers, unusable = [], [], []
    for name in _checkpoint_folders(storage):
        found = inspect_checkpoint(f"{storage.path}/{name}", storage.filesystem)
        if found.step is not None:
            complete.append(FoundCheckpoint(storage.show(name), found.step, storage.source(name), name))
        elif found.cut_short and _ours(name, found) and registered is not None and name not in registered:
            leftovers.append(name)
        else:
            unusable.append(f"{storage.show(name)}: {_why_kept(name, found, registered)}")
    if registered is None:
        unusable.append(f"{storage.show(RAY_SNAPSHOT)}: Ray Train's record of the run's checkpoints cannot be read")
    complete.sort(key=lambda c: (c.step, str(c.path)))
    return Survey(complete, leftovers, unusable, registered, snapshot)


def complete_checkpoints(run_storage: RunStorage | str | Path) -> list[FoundCheckpoint]:
    """The run's complete checkpoints, oldest step first."""
    return survey(run_storage).complete


def newest_checkpoint(run_storage: RunStorage | str | Path) -> FoundCheckpoint | None:
    found = complete_checkpoints(run_storage)
    return found[-1] if found else None


def starting_point(run_storage: RunStorage, name: str, resume: bool) -> FoundCheckpoint | None:
    """What a start of run `name` continues from: with `resume`, its newest complete checkpoint (None when
    the run has no checkpoint folder at all); without, None, after removing what failed attempts of ours
    left. Raises instead of guessing: ConfigError for a fresh start of a run that has a checkpoint,
    CheckpointError for a folder that cannot be used (or, with `resume`, for leftovers only)."""
    found = survey(run_storage)
    where = run_storage.show()
    if found.unusable:
        raise CheckpointError(
            f"run {name!r} has checkpoint folders that cannot be used: {'; '.join(found.unusable)}. Nothing was "
            f"deleted: make them readable and complete, or move them out of {where} (or choose another name)")
    if found.complete:
        newest = found.complete[-1]
        if not resume:
            raise ConfigError(
                f"name: run {name!r} already has a checkpoint at step {newest.step} ({newest.path}); pass "
                "--resume to continue it, or choose another name")
        return newest
    gone = sorted(found.registered or ())  # registered, but no longer there (any there would be unusable)
    if resume and (found.leftovers or gone):
        what = [f"{run_storage.show(n)}: an upload cut short" for n in found.leftovers]
        what += [f"{run_storage.show(n)}: registered by Ray Train, no longer there" for n in gone]
        raise CheckpointError(
            f"--resume: run {name!r} has no complete checkpoint to continue from: {'; '.join(what)}. Nothing was "
            "deleted: run without --resume to start from step 0 (which removes these leftovers)")
    if not resume:
        for leftover in found.leftovers:
            run_storage.filesystem.delete_dir(f"{run_storage.path}/{leftover}")
        if found.snapshot:  # it lists nothing that is still there, so Ray Train would restore from nothing
            run_storage.filesystem.delete_file(f"{run_storage.path}/{RAY_SNAPSHOT}")
    return None


def saved_data_position(run_storage: RunStorage, checkpoint: FoundCheckpoint) -> dict:
    """The data position `checkpoint` saved (calm_dist.data.batches.ShardedBatches.state_dict)."""
    return read_json(f"{run_storage.path}/{checkpoint.folder}/{STATE}", run_storage.filesystem).get("data", {})


def registered_checkpoints(run_storage: RunStorage | str | Path) -> set[str] | None:
    """Folder names of the checkpoints Ray Train's snapshot lists (it deletes those beyond
    num_to_keep itself); None without a readable snapshot."""
    storage = _storage(run_storage)
    try:
        snapshot = read_json(f"{storage.path}/{RAY_SNAPSHOT}", storage.filesystem)
        return {entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_unregistered(run_storage: RunStorage | str | Path) -> list[str]:
    """Delete the checkpoint folders of ours that Ray Train never registered: uploads cut short by a worker
    or driver death, or complete ones superseded since. Ray Train keeps `num_to_keep` of the registered
    ones but never sees these, so without this they pile up. Call it only when no attempt is running.
    Folders that cannot be read, or that are not provably ours, are left alone. Returns their names."""
    storage = _storage(run_storage)
    registered = registered_checkpoints(storage)
    if registered is None:
        return []
    removed = []
    for name in _checkpoint_folders(storage):
        if name in registered:
            continue
        found = inspect_checkpoint(f"{storage.path}/{name}", storage.filesystem)
        if _ours(name, found) and (found.step is not None or found.cut_short):
            storage.filesystem.delete_dir(f"{storage.path}/{name}")
            removed.append(name)
    return removed


def _checkpoint_folders(storage: RunStorage) -> list[str]:
    selector = pyarrow.fs.FileSelector(storage.path, allow_not_found=True)
    return sorted(info.base_name for info in storage.filesystem.get_file_info(selector)
                  if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX))


def _exists(storage: RunStorage, name: str) -> bool:
    return storage.filesystem.get_file_info(f"{storage.path}/{name}").type != pyarrow.fs.FileType.NotFound


def _ours(name: str, found: Inspection) -> bool:
    """Named as Ray Train names checkpoints, and holding nothing but a checkpoint's files."""
    return bool(_RAY_CHECKPOINT_NAME.fullmatch(name)) and not found.foreign


def _why_kept(name: str, found: Inspection, registered: set[str] | None) -> str:
    if not found.cut_short:
        return found.problem
    if not _RAY_CHECKPOINT_NAME.fullmatch(name):
        reason = "not named as Ray Train names checkpoints"
    elif found.foreign:
        reason = f"it holds files no checkpoint holds ({', '.join(found.foreign[:3])})"
    elif registered is None:
        reason = "Ray Train's record cannot be read"
    else:
        reason = "Ray Train registered it complete"
    return f"{found.problem}, and {reason}"
