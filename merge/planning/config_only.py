"""A merge's inputs for `calm plan`: from their weights' headers, or from their configs before the download.

When a model's weights are on disk, the plan reads their safetensors headers (merge.io.checkpoint_folder),
as the merge does. The moment a plan matters most is before a download of hundreds of GB, so for a model
whose weights are not there yet (no folder, no weight files, or shards its index names still missing)
its tensors are derived from its config.json, as the training plan derives a model's: the model is built
on PyTorch's meta device (nothing allocated) and its state dict read, leaving out a tied output embedding
as save_pretrained does; their dtype is the config's `dtype` (`torch_dtype` in older configs).

Which config: the model's own folder's config.json when it has one (configs can be fetched before the
weights), else the folder the entry's `config:` names. A model.safetensors.index.json beside that
config.json gives the tensors' names and files, so the plan meets them in the real order (safetensors
files hold their tensors sorted by name); without one they are planned as one file.

Torch and transformers are imported only for models planned from configs; the merge job never imports
this module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from merge.io.checkpoint_folder import INDEX_FILE, SINGLE_FILE, Checkpoint
from merge.io.safetensors_file import ITEMSIZE, TensorInfo, build_header
from merge.merge_config import MergeConfig, ModelEntry
from merge.merge_errors import CheckpointError, ConfigError

# config.json dtype names -> safetensors codes (those a merge reads).
DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
# Non-floating tensors of a model (persistent integer buffers) keep their own dtype.
INTEGER_CODES = {"int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@dataclass(frozen=True)
class PlannedInput:
    checkpoint: Checkpoint
    from_config: str | None  # None: read from the weights' headers; else where the tensors came from, for people


def plan_inputs(cfg: MergeConfig) -> list[PlannedInput]:
    """Every model of a merge config, from its weights when they are on disk, else from its config."""
    built: dict[Path, dict[str, tuple[tuple[int, ...], str | None]]] = {}  # one meta model per config folder
    inputs = []
    for i, entry in enumerate(cfg.models):
        name = entry.name or ""
        if weights_on_disk(entry.path):
            inputs.append(PlannedInput(Checkpoint.open(name, entry.path), None))
            continue
        folder = _config_folder(i, entry)
        if folder not in built:
            built[folder] = meta_tensors(folder)
        config = _read_json(folder / "config.json")
        dtype = config.get("dtype") or config.get("torch_dtype")
        if dtype is not None and dtype not in DTYPE_CODES:
            raise CheckpointError(f"{folder / 'config.json'}: dtype {dtype!r} is not one a merge reads "
                                  f"({', '.join(DTYPE_CODES)})")
        files = _files(folder, built[folder])
        tensors = _tensor_layout(entry.path, files, built[folder], DTYPE_CODES[dtype or "float32"])
        how = (f"{_missing(entry.path)}; its tensors from {folder / 'config.json'}"
               + (f" and {INDEX_FILE}" if (folder / INDEX_FILE).is_file() else "")
               + (f", {dtype}" if dtype else ", no dtype given: float32 assumed"))
        inputs.append(PlannedInput(Checkpoint(name, entry.path, tensors, config), how))
    return inputs


def weights_on_disk(path: Path) -> bool:
    """Whether the folder holds its weight files: model.safetensors, or every shard its index names
    (an index that cannot be read counts as present, so that Checkpoint.open names what is wrong)."""
    if (path / SINGLE_FILE).is_file():
        return True
    if not (path / INDEX_FILE).is_file():
        return False
    try:
        shards = set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values())
        return all((path / str(shard)).is_file() for shard in shards)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True


def meta_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Name -> (shape, safetensors code of an integer tensor, else None) of every tensor save_pretrained
    would store for the model folder/config.json describes, in state-dict order."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:  # not a causal LM: an embedding model, as LM-Cocktail also merges
                model = AutoModel.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: transformers cannot build the model it describes: "
                              f"{err}".replace("\n", " ")) from None
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_save", None) or []]
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or any(p.search(name) for p in ignored):
            continue  # a tied tensor is stored once, under its first name
        seen.add(id(tensor))
        integer = None if tensor.is_floating_point() else INTEGER_CODES[str(tensor.dtype).removeprefix("torch.")]
        tensors[name] = (tuple(tensor.shape), integer)
    return tensors


def _config_folder(i: int, entry: ModelEntry) -> Path:
    if (entry.path / "config.json").is_file():
        return entry.path
    if entry.config is not None:
        if not (entry.config / "config.json").is_file():
            raise ConfigError(f"models[{i}].config: {entry.config} has no config.json")
        return entry.config
    raise CheckpointError(
        f"model '{entry.name}': {_missing(entry.path)}, and there is no config to plan from: give models[{i}].config, "
        f"a folder holding the model's config.json (and its {INDEX_FILE} if at hand)")


def _missing(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is not a folder"
    if (path / INDEX_FILE).is_file():
        return f"{path} misses shards its {INDEX_FILE} names"
    return f"{path} holds no weights yet"


def _files(folder: Path, shapes: dict) -> dict[str, str]:
    """Tensor name -> the file holding it: the index's weight map, else one file for all."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return dict.fromkeys(shapes, SINGLE_FILE)
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no weight_map of tensor name -> file name")
    unknown = sorted(set(weight_map) - set(shapes))
    if unknown:
        raise CheckpointError(f"{index}: names tensor '{unknown[0]}', which the model config.json describes "
                              "does not have" + (f" ({len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return weight_map


def _tensor_layout(path: Path, files: dict[str, str], shapes: dict, dtype: str) -> dict[str, TensorInfo]:
    """Where each tensor's bytes would lie: files in name order, each file's tensors sorted by name, as
    safetensors writes them."""
    tensors = {}
    for filename in sorted(set(files.values())):
        entries = [(n, shapes[n][1] or dtype, shapes[n][0]) for n in sorted(n for n, f in files.items() if f == filename)]
        position = len(build_header(entries))
        for name, code, shape in entries:
            nbytes = math.prod(shape) * ITEMSIZE[code]
            tensors[name] = TensorInfo(str(path / filename), name, code, shape, position, nbytes)
            position += nbytes
    return tensors


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON object was expected")
    return data
