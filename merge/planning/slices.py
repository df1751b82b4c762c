"""passthrough: an output model assembled from layer slices of the inputs (mergekit's frankenmerges).

Every output tensor is one input tensor, copied (converted only when output.dtype asks). Decoder-layer
tensors (`model.layers.N.*`, GPT-2's `transformer.h.N.*`: the families of
calm_dist.model.architectures.DECODER_LAYERS) are renumbered consecutively, slice after slice, each
slice's layers in order; a layer may appear twice. The other tensors follow mergekit 0.1.5
(mergekit/plan.py, MergePlanner.plan_module): the embeddings (its architectures' pre_weights) from
slices[0]'s model, everything after the layers (final norm, output embedding: its post_weights) from
slices[-1]'s model. The config and tokenizer files are slices[0]'s model's, with the layer count and
any per-layer list (`layer_types`) rewritten for the output's layers.

Tied embeddings: when slices[0]'s and slices[-1]'s models both tie their output embedding to their input
embedding, the output ties too (mergekit's output then has no lm_head either, and loads tied to
slices[0]'s embeddings). Otherwise the output stores slices[-1]'s output embedding: its lm_head, or
for a tying model its input embedding.

Every input tensor is accounted for: copied, dropped by a `drop:` pattern, or not used by the slice
rule (a layer no slice names, the other models' non-layer tensors), each of the last with its reason.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from merge.io.checkpoint_folder import TIED_OUTPUT_EMBEDDINGS, Checkpoint
from merge.io.safetensors_file import FLOAT_CODES, TensorInfo
from merge.merge_config import OUTPUT_DTYPES, MergeConfig
from merge.merge_errors import CheckpointError, ConfigError, IncompatibleInputsError
from merge.planning.inputs import Dropped
from merge.planning.plan import COPY, OutputTensor
from merge.planning.vocab import check_same_vocabulary

# `<decoder layers>.<index>.<rest>`, the decoder layers where DECODER_LAYERS keeps them.
LAYER_NAME = re.compile(r"^(model\.layers|transformer\.h)\.(\d+)\.(.+)$")
# Non-layer tensors that come before the layers (mergekit's pre_weights for these families); every other
# non-layer tensor comes after them (its post_weights).
EMBEDDINGS = ("model.embed_tokens.", "transformer.wte.", "transformer.wpe.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")
NO_SLICE = "slices: its layer is in no slice's layer_range"
TIED = "slices: the output ties its output embedding to its input embedding, as slices[0]'s and slices[-1]'s models do"


@dataclass(frozen=True)
class SlicePlan:
    tensors: tuple[OutputTensor, ...]  # in output order: embeddings, layers, the rest
    copied_from: dict[str, tuple[str, str]]  # output tensor -> (model, input tensor)
    dropped: tuple[Dropped, ...]  # by the config's drop: patterns
    not_used: tuple[Dropped, ...]  # by the slice rule, each with its reason
    account: dict[str, dict[str, int]]  # per model: merged (none), copied, not_used, dropped
    files_from: int  # slices[0]'s model: config and tokenizer files
    ties_embeddings: bool
    config_changes: dict[str, object]  # layer count and per-layer lists of the output's config.json


@dataclass(frozen=True)
class _Split:
    """One model's tensors kept by drop:, as layers (index -> [(rest of the name, tensor)]) and the others."""

    prefix: str
    layers: dict[int, list[tuple[str, TensorInfo]]]
    others: list[TensorInfo]


def plan_slices(cfg: MergeConfig, checkpoints: Sequence[Checkpoint]) -> SlicePlan:
    """Every output tensor of a passthrough merge, checked against the inputs before any work."""
    assert cfg.slices
    first, last = (cfg.index(cfg.slices[i].sources[0].model) for i in (0, -1))
    emb, head = checkpoints[first], checkpoints[last]
    dropped = _apply_drop(cfg.drop, checkpoints)
    dropped_names = {(m, d.tensor) for d in dropped for m in d.models}
    splits = [_split(c, {n for m, n in dropped_names if m == c.name}) for c in checkpoints]
    counts = [layer_count(c) for c in checkpoints]
    outputs: list[tuple[str, TensorInfo, str]] = []  # output name, source, source model
    outputs += [(t.name, t, emb.name) for t in splits[first].others if t.name.startswith(EMBEDDINGS)]
    layer = 0
    for i, piece in enumerate(cfg.slices):
        model = cfg.index(piece.sources[0].model)
        split, ckpt = splits[model], checkpoints[model]
        start, end = piece.sources[0].layer_range
        key = f"slices[{i}].sources[0]"
        if end > counts[model]:
            raise ConfigError(f"{key}.layer_range: [{start}, {end}] goes past the {counts[model]} layers of model "
                              f"'{ckpt.name}' (its config.json)")
        if split.prefix != splits[first].prefix:
            raise IncompatibleInputsError(f"{key}.model: '{ckpt.name}' keeps its layers in {split.prefix}, the "
                                          f"output (slices[0]'s '{emb.name}') in {splits[first].prefix}")
        for index in range(start, end):
            if index not in split.layers:
                raise IncompatibleInputsError(f"{key}.layer_range: model '{ckpt.name}' has no tensors of layer {index}")
            outputs += [(f"{split.prefix}.{layer}.{rest}", t, ckpt.name) for rest, t in split.layers[index]]
            layer += 1
    ties = emb.ties_embeddings and head.ties_embeddings
    outputs += [(t.name, t, head.name) for t in splits[last].others
                if not t.name.startswith(EMBEDDINGS) and not (ties and t.name in TIED_OUTPUT_EMBEDDINGS)]
    if not ties:  # a tying head model stores no output embedding: its input embedding stands for it
        for name in TIED_OUTPUT_EMBEDDINGS:
            alias = head.tied_source(name)
            if alias is not None and (head.name, alias) not in dropped_names:
                outputs.append((name, head.tensors[alias], head.name))
    if first != last:
        check_same_vocabulary([emb, head])
    _check_shapes(outputs, emb, head)
    _check_dtypes(cfg, outputs)
    wanted = OUTPUT_DTYPES.get(cfg.output.dtype or "")
    tensors = tuple(OutputTensor(name, wanted or info.dtype, info.shape, (info,), cfg.method, (), {}, cfg.seed)
                    if info.dtype in FLOAT_CODES else
                    OutputTensor(name, info.dtype, info.shape, (info,), COPY, (), {}, cfg.seed)
                    for name, info, _ in outputs)
    copied = {(model, info.name) for _, info, model in outputs}
    not_used = _not_used(checkpoints, splits, copied, first, last, ties)
    account = {c.name: {"merged": 0, "copied": sum(m == c.name for m, _ in copied),
                        "not_used": sum(c.name in d.models for d in not_used),
                        "dropped": sum(c.name in d.models for d in dropped)} for c in checkpoints}
    changes = {_count_key(emb): layer} | _per_layer_lists(cfg, checkpoints, counts, first)
    return SlicePlan(tensors, {name: (model, info.name) for name, info, model in outputs}, dropped, not_used,
                     account, first, ties, changes)


def layer_count(ckpt: Checkpoint) -> int:
    """The model's decoder layers, as its config.json counts them."""
    count = (ckpt.config or {}).get(_count_key(ckpt))
    if not isinstance(count, int):
        raise CheckpointError(f"model '{ckpt.name}': {ckpt.path / 'config.json'} gives no layer count "
                              f"({' or '.join(LAYER_COUNT_KEYS)}), which its slices' layer_range is checked against")
    return count


def _count_key(ckpt: Checkpoint) -> str:
    return next((k for k in LAYER_COUNT_KEYS if k in (ckpt.config or {})), LAYER_COUNT_KEYS[0])


def _apply_drop(patterns: Sequence[str], checkpoints: Sequence[Checkpoint]) -> tuple[Dropped, ...]:
    holders: dict[tuple[str, int], list[str]] = {}  # (tensor, pattern) -> models, first seen first
    for ckpt in checkpoints:
        for name in ckpt.tensors:
            hit = next((i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p)), None)
            if hit is not None:
                holders.setdefault((name, hit), []).append(ckpt.name)
    for i, pattern in enumerate(patterns):
        if not any(hit == i for _, hit in holders):
            raise ConfigError(f"drop[{i}]: {pattern!r} matches no tensor of any input")
    return tuple(Dropped(name, tuple(models), f"drop[{hit}]: {patterns[hit]!r}") for (name, hit), models in holders.items())


def _split(ckpt: Checkpoint, dropped: set[str]) -> _Split:
    layers: dict[int, list[tuple[str, TensorInfo]]] = {}
    others, prefixes = [], set()
    for name, info in ckpt.tensors.items():
        if name in dropped:
            continue
        match = LAYER_NAME.match(name)
        if match is None:
            others.append(info)
            continue
        prefixes.add(match[1])
        layers.setdefault(int(match[2]), []).append((match[3], info))
    if len(prefixes) != 1:
        found = f"both {' and '.join(sorted(prefixes))}" if prefixes else "none"
        raise IncompatibleInputsError(
            f"model '{ckpt.name}': passthrough slices decoder layers stored as model.layers.N.* or transformer.h.N.*, "
            f"and this model has {found}")
    return _Split(prefixes.pop(), layers, others)


def _check_shapes(outputs: list[tuple[str, TensorInfo, str]], emb: Checkpoint, head: Checkpoint) -> None:
    """Each kind of layer tensor has one shape in the output, and the output embedding the embeddings'
    rows: inputs of other sizes would make a model that does not load."""
    seen: dict[str, tuple[str, TensorInfo, str]] = {}
    for name, info, model in outputs:
        match = LAYER_NAME.match(name)
        if match is None:
            continue
        other = seen.setdefault(match[3], (name, info, model))
        if other[1].shape != info.shape:
            raise IncompatibleInputsError(
                f"tensor '{info.name}' of model '{model}' (output '{name}') has shape {list(info.shape)}, but "
                f"'{other[1].name}' of model '{other[2]}' (output '{other[0]}') has {list(other[1].shape)}: "
                "slices must come from models of one size")
    if emb.vocab_size != head.vocab_size:
        raise IncompatibleInputsError(
            f"slices: the embeddings come from slices[0]'s model '{emb.name}' (vocab_size {emb.vocab_size}) and the "
            f"output embedding from slices[-1]'s model '{head.name}' (vocab_size {head.vocab_size}); they must agree")


def _check_dtypes(cfg: MergeConfig, outputs: list[tuple[str, TensorInfo, str]]) -> None:
    """Copies keep their dtype, so the slices' floating-point dtypes must agree unless output.dtype is set."""
    floats = {info.dtype: (info, model) for _, info, model in outputs if info.dtype in FLOAT_CODES}
    if cfg.output.dtype is None and len(floats) > 1:
        found = ", ".join(f"tensor '{info.name}' of model '{model}': {dtype}" for dtype, (info, model) in floats.items())
        raise IncompatibleInputsError(f"the slices' dtypes differ ({found}); set output.dtype to choose the output's")


def _not_used(checkpoints: Sequence[Checkpoint], splits: Sequence[_Split], copied: set[tuple[str, str]],
              first: int, last: int, ties: bool) -> tuple[Dropped, ...]:
    """Every tensor kept by drop: that no output tensor is copied from, with the slice rule's reason."""
    reasons: dict[tuple[str, str], list[str]] = {}  # (tensor, reason) -> models
    for ckpt, split in zip(checkpoints, splits, strict=True):
        kept = [t for layer in split.layers.values() for _, t in layer] + split.others
        for info in kept:
            if (ckpt.name, info.name) in copied:
                continue
            if LAYER_NAME.match(info.name):
                reason = NO_SLICE
            elif ties and info.name in TIED_OUTPUT_EMBEDDINGS:
                reason = TIED
            elif info.name.startswith(EMBEDDINGS):
                reason = f"slices: the embeddings come from slices[0]'s model, '{checkpoints[first].name}'"
            else:
                reason = f"slices: the tensors after the layers come from slices[-1]'s model, '{checkpoints[last].name}'"
            reasons.setdefault((info.name, reason), []).append(ckpt.name)
    return tuple(Dropped(name, tuple(models), reason) for (name, reason), models in reasons.items())


def _per_layer_lists(cfg: MergeConfig, checkpoints: Sequence[Checkpoint], counts: Sequence[int], first: int
                     ) -> dict[str, list]:
    """The config's per-layer lists (one entry per layer, e.g. layer_types), sliced as the layers are."""
    assert cfg.slices
    config = checkpoints[first].config or {}
    keys = [k for k, v in config.items() if isinstance(v, list) and len(v) == counts[first] and k != "architectures"]
    lists: dict[str, list] = {key: [] for key in keys}
    for i, piece in enumerate(cfg.slices):
        model = cfg.index(piece.sources[0].model)
        start, end = piece.sources[0].layer_range
        for key in keys:
            values = (checkpoints[model].config or {}).get(key)
            if not isinstance(values, list) or len(values) != counts[model]:
                raise IncompatibleInputsError(
                    f"slices[{i}].sources[0].model: the output's config (slices[0]'s '{checkpoints[first].name}') "
                    f"has a {key!r} per layer, and model '{checkpoints[model].name}''s config.json has none for its "
                    f"{counts[model]} layers")
            lists[key] += values[start:end]
    return lists
