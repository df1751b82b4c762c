"""What a training checkpoint folder holds and when it is complete, without DeepSpeed or Ray.

Each rank writes its own files (DeepSpeed's shards), then RANKS/<rank>.json listing them with their
sizes; rank 0 also writes STATE (step, data position, world size). Ray Train copies every rank's
files into one checkpoint folder in no particular order, so a folder is complete only when all
world_size lists are there and every file they name has its full size.
"""

from __future__ import annotations

import json
from pathlib import Path

STATE = "training_state.json"
RANKS = "ranks"


def write_rank_manifest(directory: str | Path, rank: int) -> None:
    """List the files this rank wrote into its own checkpoint directory, with their sizes."""
    directory = Path(directory)
    files = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}
    (directory / RANKS).mkdir(exist_ok=True)
    (directory / RANKS / f"{rank}.json").write_text(json.dumps(files))


def checkpoint_step(directory: str | Path) -> int:
    """The step a checkpoint folder was saved at."""
    return int(json.loads((Path(directory) / STATE).read_text())["step"])


def complete_step(folder: str | Path) -> int | None:
    """The checkpoint's step if every rank's files are in `folder` at their full size, else None."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_text())
        step, world_size = int(state["step"]), int(state["world_size"])
        for rank in range(world_size):
            files = json.loads((folder / RANKS / f"{rank}.json").read_text())
            for name, size in files.items():
                if (folder / name).stat().st_size != size:
                    return None
    except (OSError, ValueError, KeyError, TypeError):  # missing, half-copied, or an older format
        return None
    return step
