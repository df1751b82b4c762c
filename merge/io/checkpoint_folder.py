"""A Hugging Face checkpoint folder as the merge sees it: tensor name -> where its bytes are, plus config.

Only headers are read here. A folder holds either `model.safetensors` or shards listed in
`model.safetensors.index.json`; both are validated against each other so a missing shard, a tensor the
index misplaces or a corrupt header is reported with the file at fault. checkpoint_tensors() is the one
reader of a folder's weight files: the training preflight (launcher/weight_files.py) uses it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merge.io.safetensors_file import MERGE_CODES, TensorInfo, read_header
from merge.merge_errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Output-embedding names and the input embeddings they alias when a checkpoint ties them (and so
# stores only the input embedding): Llama/Mistral/Qwen/Gemma, GPT-2, OPT.
TIED_OUTPUT_EMBEDDINGS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight"),
}


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path
    tensors: dict[str, TensorInfo]  # in file order, shard by shard
    config: dict | None

    @classmethod
    def open(cls, name: str, path: Path) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model '{name}': {path} is not a folder")
        tensors = checkpoint_tensors(path)
        if tensors is None:
            others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".safetensors"))
            hint = f" (found {', '.join(others)}; convert to {SINGLE_FILE} or shards with {INDEX_FILE})" if others else ""
            raise CheckpointError(f"model '{name}': no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")
        for info in tensors.values():
            if info.dtype not in MERGE_CODES:
                raise CheckpointError(f"{info.path}: tensor '{info.name}': unsupported dtype {info.dtype!r} "
                                      f"(supported: {', '.join(MERGE_CODES)})")
        config = _read_json(path / "config.json") if (path / "config.json").exists() else None
        return cls(name, path, tensors, config)

    @property
    def vocab_size(self) -> int | None:
        config = self.config or {}
        size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
        return size if isinstance(size, int) else None

    def tied_source(self, name: str) -> str | None:
        """The stored tensor that stands for `name` when this checkpoint ties it away, else None.

        A checkpoint ties its output embedding when it does not store it and its config does not say
        tie_word_embeddings: false (older configs omit the key when it holds the class default).
        """
        if name in self.tensors or name not in TIED_OUTPUT_EMBEDDINGS:
            return None
        if (self.config or {}).get("tie_word_embeddings") is False:
            raise CheckpointError(
                f"model '{self.name}': {name} is missing although config.json says tie_word_embeddings: false"
            )
        return next((src for src in TIED_OUTPUT_EMBEDDINGS[name] if src in self.tensors), None)

    @property
    def ties_embeddings(self) -> bool:
        """Whether this checkpoint's output embedding is (or stands for) its input embedding."""
        tie = (self.config or {}).get("tie_word_embeddings")
        stored = [n for n in TIED_OUTPUT_EMBEDDINGS if n in self.tensors]
        return tie is True or (tie is None and len(stored) < len(TIED_OUTPUT_EMBEDDINGS))


def checkpoint_tensors(path: Path) -> dict[str, TensorInfo] | None:
    """Every tensor of a folder's safetensors weights by name, in file order shard by shard: the shards
    its index names, checked against it, else model.safetensors; None when it has neither file.
    CheckpointError (HeaderError for a file's own problems) names the file at fault."""
    path = Path(path)
    if (path / INDEX_FILE).exists():
        return _read_sharded(path / INDEX_FILE)
    if (path / SINGLE_FILE).exists():
        return {t.name: t for t in read_header(path / SINGLE_FILE)}
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON object was expected")
    return data


def _read_sharded(index_path: Path) -> dict[str, TensorInfo]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: no weight_map of tensor name -> file name")
    filenames = sorted(set(weight_map.values()))
    for filename in filenames:  # all present before any is read: a download cut short is the likely story
        if Path(filename).name != filename:
            raise CheckpointError(f"{index_path}: shard name {filename!r} is not a plain file name")
        if not (index_path.parent / filename).exists():
            raise CheckpointError(f"{index_path} names {filename}, which is missing (an unfinished download?)")
    tensors: dict[str, TensorInfo] = {}
    for filename in filenames:
        shard = index_path.parent / filename
        for info in read_header(shard):
            if weight_map.get(info.name) != filename:
                raise CheckpointError(
                    f"{shard}: holds '{info.name}', which {INDEX_FILE} maps to {weight_map.get(info.name)!r}"
                )
            tensors[info.name] = info
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{index_path}: maps '{missing[0]}' to {weight_map[missing[0]]}, which does not contain it"
            + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
        )
    return tensors
