"""A run's checkpoints on disk: which are complete and newest, and what failed or restarted attempts left.

Decisions go by checkpoints, not by folders: a run folder left by an attempt that failed before its
first checkpoint is no run to resume (and no obstacle to a fresh start), and the newest checkpoint is
the highest step among the complete ones, whatever their modification times or what Ray Train's
own snapshot registered (a driver killed between a checkpoint's upload and its registration leaves
the snapshot one checkpoint behind).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from calm_dist.distributed.checkpoint_layout import complete_step

# Ray Train's names for its checkpoint folders and its record of the checkpoints it registered.
CHECKPOINT_GLOB = "checkpoint_*"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class FoundCheckpoint:
    path: Path
    step: int


def complete_checkpoints(run_storage: str | Path) -> list[FoundCheckpoint]:
    """The run's complete checkpoints, oldest step first."""
    found = []
    for folder in Path(run_storage).glob(CHECKPOINT_GLOB):
        step = complete_step(folder) if folder.is_dir() else None
        if step is not None:
            found.append(FoundCheckpoint(folder, step))
    return sorted(found, key=lambda c: (c.step, c.path.name))


def newest_checkpoint(run_storage: str | Path) -> FoundCheckpoint | None:
    found = complete_checkpoints(run_storage)
    return found[-1] if found else None


def registered_checkpoints(run_storage: str | Path) -> set[str] | None:
    """Folder names of the checkpoints Ray Train's snapshot lists (it deletes those beyond
    num_to_keep itself); None without a readable snapshot."""
    try:
        snapshot = json.loads((Path(run_storage) / RAY_SNAPSHOT).read_text())
        return {entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_unregistered(run_storage: str | Path) -> list[Path]:
    """Delete the checkpoint folders that Ray Train never registered: uploads cut short by a worker or
    driver death, or complete ones superseded since. Ray Train keeps `num_to_keep` of the registered
    ones but never sees these, so without this they pile up. Call it only when no attempt is running."""
    registered = registered_checkpoints(run_storage)
    if registered is None:
        return []
    removed = []
    for folder in Path(run_storage).glob(CHECKPOINT_GLOB):
        if folder.is_dir() and folder.name not in registered:
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def clear_failed_attempts(run_storage: str | Path) -> None:
    """Before a fresh start of a run that has no complete checkpoint: remove the partial checkpoint
    folders and Ray Train's snapshot of them that earlier attempts left, so Ray Train starts clean.
    Only what Ray Train wrote for this run is touched."""
    run_storage = Path(run_storage)
    if newest_checkpoint(run_storage) is not None:
        raise ValueError(f"{run_storage} holds a complete checkpoint; it is not a failed attempt")
    for folder in run_storage.glob(CHECKPOINT_GLOB):
        if folder.is_dir():
            shutil.rmtree(folder)
    (run_storage / RAY_SNAPSHOT).unlink(missing_ok=True)
