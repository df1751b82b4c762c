"""Preflight of a model's weight files: whole, and consistent with the model's config.

Every safetensors file is checked from the headers alone (no weight is read).

A download cut short keeps a valid header over missing data, and a checkpoint of another size or
family has tensors of other names or shapes: either would otherwise fail on every worker after the
cluster started. The files are read as the merge reads them (merge.io.checkpoint_folder: the index and
the shards it names, each header validated against its file); the names are matched to the model's
parameters exactly as loading matches them (calm_dist.distributed.weight_names), on a model built on
the meta device.
"""

from __future__ import annotations

from pathlib import Path

from calm_dist.errors import CompositionError
from launcher.train_config import ConfigError
from merge.io.checkpoint_folder import checkpoint_tensors
from merge.io.safetensors_file import TensorInfo
from merge.merge_errors import CheckpointError, HeaderError

# What a model parameter may be stored as; loading casts it to the configured dtype.
PARAMETER_DTYPES = ("F16", "BF16", "F32", "F64")


def read_tensors(path: Path, key: str) -> dict[str, TensorInfo] | None:
    """The tensors of a model folder's safetensors weights (None when it has none), every file checked;
    ConfigError naming `key`, the file and the problem."""
    try:
        return checkpoint_tensors(path)
    except HeaderError as err:
        raise ConfigError(f"{key}: {err.path} is not a readable safetensors file ({err.problem})") from None
    except CheckpointError as err:
        raise ConfigError(f"{key}: {err}") from None


def check_weights(path: str | Path, key: str, trust_remote_code: bool = False, safetensors_only: bool = False) -> int | None:
    """Check every weight file of a model folder; the model's parameter count (None for .bin weights).

    safetensors_only: the model is loaded partitioned, which reads only safetensors files.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from calm_dist.distributed.weight_names import plan_weights

    path = Path(path)
    tensors = read_tensors(path, key)
    if tensors is None:
        if safetensors_only:
            raise ConfigError(f"{key}: {path} has no *.safetensors weights; the anchor is loaded partitioned, "
                              "which reads safetensors only (convert with save_pretrained(safe_serialization=True))")
        return None  # pytorch_model*.bin: transformers checks those when it loads them

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
        info = tensors[name]
        expected = list(model.get_parameter(parameter).shape)
        if list(info.shape) != expected:
            raise ConfigError(f"{key}: {info.path}: tensor {name} has shape {list(info.shape)}, but {path}/config.json "
                              f"implies {expected}")
        if info.dtype not in PARAMETER_DTYPES:
            raise ConfigError(f"{key}: {info.path}: tensor {name} is stored as {info.dtype}, not a floating-point "
                              f"type ({', '.join(PARAMETER_DTYPES)}); quantized checkpoints are not supported")
    stored = [*plan.sources.values(), *plan.converted.values()]
    return sum(tensors[name].numel for name in dict.fromkeys(stored))
