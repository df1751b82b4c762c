"""The output folder: checks before anything is written, and the non-weight files a Hugging Face
checkpoint needs (config, generation config, tokenizer), copied from one input."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from merge.checkpoint import Checkpoint
from merge.errors import OutputError

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


def check_output_folder(out: Path, checkpoints: list[Checkpoint]) -> bool:
    """Whether `out` already holds something (then it must be this merge, resumed). Raises if `out` is
    an input, lies inside one, or is a file."""
    resolved = out.resolve()
    for ckpt in checkpoints:
        if resolved == ckpt.path.resolve() or ckpt.path.resolve() in resolved.parents:
            raise OutputError(f"{out}: the output folder is inside input model '{ckpt.name}' ({ckpt.path})")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    return out.exists() and any(out.iterdir())


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
