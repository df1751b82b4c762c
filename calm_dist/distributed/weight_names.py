"""Which checkpoint tensor fills which model parameter, decided the way transformers' `from_pretrained`
decides it, without loading any weight.

Checkpoints on model hubs do not always use the names of the class that loads them: a GPT-2 saved from
`GPT2Model` says `wte.weight` where `GPT2LMHeadModel` has `transformer.wte.weight`, older ones say
`gamma` for `weight`, and a tied model stores its shared embedding once. transformers resolves this
with the model's own conversion mapping (renamings), its `base_model_prefix` (added or stripped), and
its tied-weight API (`get_expanded_tied_weights_keys`). Partitioned loading and the preflight check use
this module, so both agree with `from_pretrained` and with each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from calm_dist.errors import CompositionError


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a single-file or sharded checkpoint."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CompositionError(f"{index}: not a safetensors index ({err})") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise CompositionError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as err:  # safetensors raises its own error type for a corrupt header
        raise CompositionError(f"{single}: not a readable safetensors file ({err})") from None


@dataclass
class WeightPlan:
    """sources: model parameter name -> checkpoint tensor name, one entry per parameter to read.
    ties: (target, source) parameter names; target becomes the very same parameter as source.
    converted: checkpoint tensors that transformers converts (fuses, splits) on loading, by parameter;
    from_pretrained handles them, reading tensors as stored does not."""

    sources: dict[str, str] = field(default_factory=dict)
    ties: list[tuple[str, str]] = field(default_factory=list)
    converted: dict[str, str] = field(default_factory=dict)


def plan_weights(model: nn.Module, checkpoint_names: list[str] | set[str], folder: str | Path) -> WeightPlan:
    """Match a checkpoint's tensor names to the parameters of `model` (built empty: on the meta device or
    under zero.Init); CompositionError naming the parameter when one has no tensor."""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    # rename_source_key only asks whether a name exists, so the names alone stand in for the state dict.
    exists = dict.fromkeys(parameters, True)
    prefix = getattr(model, "base_model_prefix", "") or None

    plan = WeightPlan()
    for key in sorted(checkpoint_names):
        renamed, converter = rename_source_key(key, renamings, converters, prefix, exists)
        if renamed not in parameters and key in parameters:  # as from_pretrained: renamings may overreach
            renamed, converter = rename_source_key(key, [], [], prefix, exists)
        if renamed not in parameters:
            continue  # unexpected in the checkpoint (a saved buffer such as GPT-2's attn.bias): ignored
        if converter is not None:
            plan.converted[renamed] = key
        else:
            plan.sources[renamed] = key

    tied = model.get_expanded_tied_weights_keys(all_submodels=True) if hasattr(
        model, "get_expanded_tied_weights_keys") else {}
    for target, source in tied.items():
        if target in plan.sources and source in plan.sources:
            continue  # both stored: from_pretrained leaves them untied unless equal; loading both is exact
        if target in plan.sources:  # only the target stored: tie the other way round, as transformers does
            target, source = source, target
        if source in plan.sources:
            plan.ties.append((target, source))

    tied_targets = {target for target, _ in plan.ties}
    for name in sorted(parameters):
        if name not in plan.sources and name not in tied_targets and name not in plan.converted:
            raise CompositionError(f"{folder}: tensor {name} is missing from the checkpoint (nor is it tied to "
                                   "a stored tensor)")
    return plan


def apply_ties(model: nn.Module, ties: list[tuple[str, str]]) -> None:
    """Make each tie's target the very same parameter object as its source, so the two are one tensor
    (one ZeRO-3 partition) that the checkpoint fills once."""
    for target, source in ties:
        parent_name, _, attribute = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, model.get_parameter(source))
