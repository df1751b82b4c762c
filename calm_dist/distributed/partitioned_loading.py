"""Load a frozen Hugging Face model straight into ZeRO-3 partitions: no rank ever holds it whole.

The model is built empty under `deepspeed.zero.Init` (each parameter is partitioned the moment its
module is constructed), then every rank copies only its own slice of each tensor out of the
memory-mapped safetensors files. ZeRO-3 keeps a parameter as one flat tensor padded to a multiple of
the group size, and rank r owns elements [r * part, (r + 1) * part); that slice of the flattened
checkpoint tensor is all a rank reads. Unlike `from_pretrained` under `HfDeepSpeedConfig`, this works
for any process group, which the pipelined placement needs (the anchor's ZeRO group excludes the
augmenting ranks).
"""

from __future__ import annotations

import math
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from calm_dist.distributed.weight_names import apply_ties, checkpoint_files, plan_weights
from calm_dist.errors import CompositionError


def _flat_range(handle, name: str, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor, reading only the rows that hold them."""
    view = handle.get_slice(name)
    shape = view.get_shape()
    if len(shape) <= 1:
        return view[start:stop].flatten() if shape else view[:].flatten()[start:stop]
    row = math.prod(shape[1:])
    first, last = start // row, (stop + row - 1) // row
    rows = view[first:last].flatten()
    return rows[start - first * row : stop - first * row]


def load_partitioned(
    path: str | Path,
    ds_config: dict,
    dtype: torch.dtype,
    group: dist.ProcessGroup | None = None,
    trust_remote_code: bool = False,
    auto_class: type = AutoModelForCausalLM,
) -> nn.Module:
    """A frozen model (a causal LM unless `auto_class` says otherwise, e.g. AutoModel for an embedding
    model) whose parameters are ZeRO-3 partitions over `group`, filled from `path`."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if dtype not in (torch.float32, torch.bfloat16):
        raise CompositionError(f"{path}: partitioned loading supports float32 and bfloat16, not {dtype}")
    # zero.Init ignores an explicit dtype on accelerators without fp16 (DeepSpeed 0.19 picks bf16 by
    # operator precedence), but honours the config's bf16 switch: set that instead.
    # zero.Init also checks batch sizes against the whole world, which is wrong when `group` is a subgroup;
    # it only needs the ZeRO and precision settings.
    init_config = {k: v for k, v in ds_config.items() if k not in ("train_batch_size", "gradient_accumulation_steps")}
    init_config.update(bf16={"enabled": dtype == torch.bfloat16}, fp16={"enabled": False})
    with deepspeed.zero.Init(data_parallel_group=group, config_dict_or_path=init_config), no_init_weights():
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.requires_grad_(False).eval()
    _restore_buffers(model, auto_class, config, dtype, trust_remote_code)

    files = checkpoint_files(path)
    plan = plan_weights(model, files, path)
    if plan.converted:
        name, key = next(iter(plan.converted.items()))
        raise CompositionError(f"{path}: tensor {key} must be converted to fill {name} (transformers does so on "
                               "loading); partitioned loading reads tensors as stored: save the anchor with "
                               "save_pretrained first")
    # Tied parameters become one parameter, hence one partition filled once (zero.Init built them apart).
    apply_ties(model, plan.ties)
    handles: dict[Path, object] = {}
    try:
        for name, param in model.named_parameters():
            source = plan.sources[name]
            file = files[source]
            try:
                if file not in handles:
                    handles[file] = safe_open(file, "pt").__enter__()
                actual = tuple(handles[file].get_slice(source).get_shape())
                expected = tuple(param.ds_shape)
                if actual != expected:
                    raise CompositionError(f"{file}: tensor {source} has shape {actual}, the config implies {expected}")
                part = param.ds_tensor.ds_numel
                start = min(dist.get_rank(group) * part, param.ds_numel)
                stop = min(start + part, param.ds_numel)
                if stop > start:
                    piece = _flat_range(handles[file], source, start, stop)
                    param.ds_tensor.data[: stop - start].copy_(piece.to(dtype))
            except CompositionError:
                raise
            except Exception as err:  # safetensors' own error type: a corrupt or truncated file
                raise CompositionError(f"{file}: tensor {source} cannot be read ({err})") from None
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return model


def _restore_buffers(model: nn.Module, auto_class: type, config, dtype: torch.dtype, trust_remote_code: bool) -> None:
    """Give the model the buffers from_pretrained(dtype=) would: zero.Init casts every floating tensor made
    in __init__ to the training dtype, buffers included, so in bf16 the rotary inv_freq (computed in fp32
    by transformers) came out rounded, and the logits of a real model moved by up to 1.0. The buffers are
    rebuilt here outside zero.Init, with the parameters on the meta device (no weights are made)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), no_init_weights():
        reference = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, buffer in reference.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if module._buffers.get(leaf) is not None:  # replaced in place: it stays (non-)persistent
            module._buffers[leaf] = buffer.to(module._buffers[leaf].device)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter data this rank actually holds (its partitions for ZeRO-3 parameters)."""
    total = 0
    for param in model.parameters():
        data = param.ds_tensor if hasattr(param, "ds_tensor") else param.data
        total += data.numel() * data.element_size()
    return total
