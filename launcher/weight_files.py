"""Preflight of a model's weight files: every safetensors file whole and consistent with the model's
config, checked from the headers alone (no weight is read).

A download cut short keeps a valid header over missing data, and a checkpoint of another size or
family has tensors of other names or shapes: either would otherwise fail on every worker after the
cluster started. The names are matched to the model's parameters exactly as loading matches them
(calm_dist.distributed.weight_names), on a model built on the meta device.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from calm_dist.errors import CompositionError
from launcher.train_config import ConfigError

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# What a model parameter may be stored as; loading casts it to the configured dtype.
PARAMETER_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER = 100_000_000  # the format's own limit


def weight_files(path: Path, key: str) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded: those its index names, all present)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            raise ConfigError(f"{key}: {index} is not a safetensors index: {err}") from None
        for name in names:
            if not (path / name).is_file():
                raise ConfigError(f"{key}: {index} names {name}, which is missing (an unfinished download?)")
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))


def read_header(file: Path, key: str) -> dict[str, dict]:
    """The tensors of a safetensors file (name -> dtype, shape, data_offsets), after checking that the
    offsets tile the data section exactly and the data section ends where the file ends."""

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"{key}: {file} is not a readable safetensors file ({reason})")

    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(MAX_HEADER, size - 8):
                raise bad(f"header length {length} in a file of {size} bytes")
            header = json.loads(f.read(length))
    except struct.error:
        raise bad(f"{size} bytes, shorter than the 8-byte header length") from None
    except (OSError, ValueError) as err:
        raise bad(f"header: {err}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError(f"shape {shape}")
        except (KeyError, TypeError, ValueError) as err:
            raise bad(f"tensor {name}: malformed entry {entry!r}: {err}") from None
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {name}: unknown dtype {dtype!r}")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(f"tensor {name}: {end - begin} bytes of data for a {dtype} tensor of shape {shape}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"tensor {name} starts at data byte {begin}, expected {position} (overlap or gap)")
        position = end
    data_size = size - 8 - length
    if position != data_size:
        cut = "truncated, an unfinished download?" if position > data_size else "trailing bytes"
        raise bad(f"{cut}: its tensors need {position} bytes of data after the header, the file holds {data_size}")
    return header


def check_weights(path: str | Path, key: str, trust_remote_code: bool = False, safetensors_only: bool = False) -> int | None:
    """Check every weight file of a model folder; the model's parameter count (None for .bin weights).

    safetensors_only: the model is loaded partitioned, which reads only safetensors files.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from calm_dist.distributed.weight_names import plan_weights

    path = Path(path)
    files = weight_files(path, key)
    if not files:
        if safetensors_only:
            raise ConfigError(f"{key}: {path} has no *.safetensors weights; the anchor is loaded partitioned, "
                              "which reads safetensors only (convert with save_pretrained(safe_serialization=True))")
        return None  # pytorch_model*.bin: transformers checks those when it loads them
    tensors: dict[str, tuple[Path, dict]] = {}
    for file in files:
        for name, entry in read_header(file, key).items():
            tensors[name] = (file, entry)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for name, file in json.loads(index.read_text())["weight_map"].items():
            if name not in tensors or tensors[name][0].name != file:
                raise ConfigError(f"{key}: {index} puts tensor {name} in {file}, whose header does not hold it")

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    try:
        plan = plan_weights(model, tensors, path)
    except CompositionError as err:
        raise ConfigError(f"{key}: {err}") from None
    if plan.converted and safetensors_only:
        name, stored = next(iter(plan.converted.items()))
        raise ConfigError(f"{key}: {path}: tensor {stored} must be converted to fill {name} (transformers does so "
                          "on loading); the anchor is loaded partitioned, reading tensors as stored: save it with "
                          "save_pretrained first")
    for parameter, name in plan.sources.items():
        file, entry = tensors[name]
        expected = list(model.get_parameter(parameter).shape)
        if entry["shape"] != expected:
            raise ConfigError(f"{key}: {file}: tensor {name} has shape {entry['shape']}, but {path}/config.json "
                              f"implies {expected}")
        if entry["dtype"] not in PARAMETER_DTYPES:
            raise ConfigError(f"{key}: {file}: tensor {name} is stored as {entry['dtype']}, not a floating-point "
                              f"type ({', '.join(PARAMETER_DTYPES)}); quantized checkpoints are not supported")
    stored = [*plan.sources.values(), *plan.converted.values()]
    return sum(math.prod(tensors[name][1]["shape"]) for name in dict.fromkeys(stored))
