"""The output folder: checks before anything is written, and the non-weight files copied into it.

The non-weight files are those a Hugging Face checkpoint needs (config, generation config, tokenizer),
copied from one input."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Iterator
from pathlib import Path

from merge.io.checkpoint_folder import Checkpoint
from merge.merge_errors import OutputError

# Files copied from the chosen input: everything a loader or tokenizer reads besides the weights.
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "preprocessor_config.json",
)


def is_leftover(path: Path) -> bool:
    """A temporary file of ours (write_atomic's `.NAME.tmp`, a shard's `.NAME.partial`): a crash may
    leave one behind, and the next write of that name replaces it."""
    return path.name.startswith(".") and path.name.endswith((".tmp", ".partial"))


def check_output_folder(out: Path, checkpoints: list[Checkpoint]) -> bool:
    """Whether `out` already holds something (then it must be this merge, resumed); a folder holding
    only our temporary files (a crash before the first manifest) starts afresh. Raises if `out` is an
    input, lies inside one, is a file, or cannot be created or written."""
    resolved = out.resolve()
    for ckpt in checkpoints:
        if resolved == ckpt.path.resolve() or ckpt.path.resolve() in resolved.parents:
            raise OutputError(f"{out}: the output folder is inside input model '{ckpt.name}' ({ckpt.path})")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    check_writable(out)
    return out.exists() and any(not is_leftover(p) for p in out.iterdir())


def check_writable(out: Path) -> None:
    """Fail before any work if the output folder cannot be created or written: its nearest existing
    ancestor must be a writable folder (os.access; the writes themselves are guarded too, for what
    access() cannot see, e.g. root on a read-only mount)."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{out}: cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot be {'written' if existing == out else 'created'}: {existing} is not writable")


def auxiliary_files(source: Checkpoint, config_changes: dict[str, object]) -> dict[str, bytes]:
    """Name -> content of the files to write beside the shards. config.json is copied byte for byte
    unless the merge changes what it must say (dtype, tied embeddings)."""
    files = {}
    for path in sorted(source.path.iterdir()):
        if path.is_file() and any(fnmatch.fnmatchcase(path.name, p) for p in AUX_PATTERNS):
            files[path.name] = path.read_bytes()
    if "config.json" in files and source.config is not None:
        changed = {k: v for k, v in config_changes.items() if k not in source.config or source.config[k] != v}
        if changed:
            files["config.json"] = (json.dumps({**source.config, **changed}, indent=2, sort_keys=True) + "\n").encode()
    return files


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Disk errors while writing the output (a full disk, a read-only folder) are the user's to fix."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"{err.filename or path}: cannot write: {err.strerror or err}") from err
