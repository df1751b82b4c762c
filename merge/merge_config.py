"""The merge config: one validated pydantic model is the single source of every option.

Unknown keys and wrong types fail with their key path (`output.max_shard_size: ...`). Rules across
fields (a base model that exists, one finite weight per model, each method's own parameters, override
patterns) are checked here too, so the rest of the job can trust the config. Relative paths in a config
file are taken from the file's folder (as in the project's other configs).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from merge.merge_errors import ConfigError
from merge.methods.specs import SPECS, MethodSpec

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# Output dtype names (as in torch and config.json) -> safetensors codes.
OUTPUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    path: Path
    name: str | None = Field(None, min_length=1, description="how other keys refer to it; default: folder name")
    # Plan-only: not part of the merge's identity (excluded from the fingerprint's dump).
    config: Path | None = Field(
        None, exclude=True,
        description="a folder with the model's config.json (and model.safetensors.index.json if at hand): "
                    "`calm plan` reads it while `path` has no weights and no config.json yet; the merge ignores it",
    )


class ExamplesWeights(_Strict):
    """LM-Cocktail's weights from a few examples: w = softmax(-loss / temperature)."""

    examples: Path = Field(
        description="JSONL; decoder: {'input': ..., 'output': ...} per line; embedding: {'query': ..., 'pos': [...], 'neg': [...]}"
    )
    temperature: float = Field(5.0, gt=0, allow_inf_nan=False)
    kind: Literal["decoder", "embedding"] = "decoder"
    # Defaults are LM_Cocktail's (mix_models_with_data): they shape the losses, so the weights.
    max_length: PositiveInt = 2048
    batch_size: PositiveInt = 2
    pooling: Literal["cls", "mean"] = Field("cls", description="embedding models: how a text becomes a vector")
    negatives: PositiveInt = Field(7, description="embedding models: seeded negatives per example, from its 'neg'")
    contrastive_temperature: float = Field(0.05, gt=0, allow_inf_nan=False)
    seed: int = 0
    device_map: str | None = Field(None, description="'auto' spreads each model over GPUs, CPU and disk")
    max_memory: dict[str | int, str] | None = None
    offload_folder: Path | None = None
    fixed: dict[str, FiniteFloat] = Field(
        {}, description="LM-Cocktail's second step: these models get this weight; the rest share what is left"
    )
    workers: PositiveInt = Field(
        1, description="load each candidate partitioned with ZeRO-3 over this many Ray workers (each holds 1/N)"
    )


class Override(_Strict):
    pattern: str = Field(min_length=1, description="shell-style glob over tensor names; the first match wins")
    weights: list[FiniteFloat] | None = None
    parameters: dict[str, Any] = {}


class TokenizerSpec(_Strict):
    """Merging models whose vocabularies differ (mergekit's `tokenizer:`): which tokenizer the output has,
    and where each token's embedding and output rows come from (merge/planning/vocab.py)."""

    source: str = Field(
        min_length=1,
        description="'union': every input's tokens, the base's (or first model's) ids first; 'base' or a "
                    "model's name: that model's tokenizer",
    )
    tokens_default: Literal["zero", "mean", "base"] | None = Field(
        None,
        description="source base or a model: the row an input lacking a token contributes: zeros, the mean "
                    "of the rows of the inputs that have it, or the base's (first model's) row",
    )


class SliceSource(_Strict):
    model: str = Field(min_length=1, description="the model's name")
    layer_range: tuple[NonNegativeInt, NonNegativeInt] = Field(
        description="[start, end]: its decoder layers start to end - 1, as mergekit counts them"
    )


class LayerSlice(_Strict):
    """passthrough: one run of consecutive decoder layers of one model (merge/planning/slices.py)."""

    sources: list[SliceSource] = Field(min_length=1, description="exactly one: passthrough copies, it does not mix")


class OutputSpec(_Strict):
    path: Path
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="default: the inputs'")
    max_shard_size: ByteSize = ByteSize(5 * 10**9)
    copy_files_from: str | None = Field(None, description="model whose config and tokenizer files are copied")


class MergeConfig(_Strict):
    method: str
    models: list[ModelEntry] = Field(min_length=1)
    base_model: str | None = None
    weights: list[FiniteFloat] | None = None
    weights_from_examples: ExamplesWeights | None = None
    parameters: dict[str, Any] = {}
    overrides: list[Override] = []
    integer_tensors_from: str | None = None
    vocab_policy: Literal["error", "truncate"] = "error"
    tokenizer: TokenizerSpec | None = None
    slices: list[LayerSlice] | None = Field(
        None, description="passthrough: the output's decoder layers, slice after slice, renumbered from 0"
    )
    drop: list[str] = Field(
        [], description="shell-style globs: input tensors matching one are left out of the output (and listed "
                        "in merge_report.json); a tensor some inputs lack must be dropped by one"
    )
    seed: int = Field(0, description="DARE's masks")
    memory_budget: ByteSize = ByteSize(2 * 2**30)
    workers: PositiveInt = 1
    output: OutputSpec

    @property
    def names(self) -> list[str]:
        return [m.name or "" for m in self.models]

    @property
    def merge_method(self) -> MethodSpec:
        return SPECS[self.method]

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def base_index(self) -> int | None:
        """The base model's position; SLERP's default base (t = 0) is the first model."""
        if self.base_model is not None:
            return self.index(self.base_model)
        return 0 if self.merge_method.uses_base else None

    @property
    def vocab_base_index(self) -> int:
        """The model whose tokenizer ids come first (tokenizer source base, union) and whose rows
        tokens_default: base takes: the base model, else the first (mergekit's rule)."""
        return self.base_index or 0

    @property
    def mixed_count(self) -> int:
        """How many models the method mixes: all but the base, if there is one."""
        return len(self.models) - (0 if self.base_index is None else 1)

    @property
    def source_order(self) -> list[int]:
        """Model positions in the order a method receives them: the base first, if it has one."""
        base = self.base_index
        if base is None:
            return list(range(len(self.models)))
        return [base] + [i for i in range(len(self.models)) if i != base]

    def params_for(self, override: Override | None) -> BaseModel:
        merged = {**self.parameters, **(override.parameters if override else {})}
        return self.merge_method.params.model_validate(merged)


def load_config(path: str | Path, updates: dict[str, Any] | None = None) -> MergeConfig:
    """Read, validate and resolve a YAML config. `updates` are dotted keys from the command line."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    for dotted, value in (updates or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):  # else leave the bad value for validation to report
            node[leaf] = value
    return validate_config(raw, source=str(path), base=Path(path).absolute().parent)


def validate_config(raw: dict[str, Any], source: str = "config", base: Path | None = None) -> MergeConfig:
    """Validate a config mapping; relative paths are taken from `base` (default: the current folder)."""
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from err
    try:
        _check(cfg)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from err
    base = base or Path.cwd()

    def resolve(path: Path) -> Path:
        return Path(os.path.normpath(base / path))

    for entry in cfg.models:
        entry.path = resolve(entry.path)
        entry.config = resolve(entry.config) if entry.config else None
    cfg.output.path = resolve(cfg.output.path)
    if cfg.weights_from_examples:
        spec = cfg.weights_from_examples
        spec.examples = resolve(spec.examples)
        spec.offload_folder = resolve(spec.offload_folder) if spec.offload_folder else None
    return cfg


def _key_path(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _describe(err: ValidationError, prefix: tuple[str | int, ...] = ()) -> str:
    return "; ".join(f"{_key_path(prefix + tuple(e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())


def _check(cfg: MergeConfig) -> None:
    """Rules that span fields; each ValueError starts with the key at fault."""
    if cfg.method not in SPECS:
        raise ValueError(f"method: unknown method {cfg.method!r} (known: {', '.join(SPECS)})")
    method = cfg.merge_method
    for i, entry in enumerate(cfg.models):
        entry.name = entry.name or entry.path.name
        if cfg.names.index(entry.name) != i:
            raise ValueError(f"models[{i}].name: {entry.name!r} is used twice; give each model a distinct name")

    def known(key: str, name: str | None) -> None:
        if name is not None and name not in cfg.names:
            raise ValueError(f"{key}: no model named {name!r} (models: {', '.join(cfg.names)})")

    known("base_model", cfg.base_model)
    known("output.copy_files_from", cfg.output.copy_files_from)
    known("integer_tensors_from", cfg.integer_tensors_from)
    low, high = method.model_count
    count = cfg.mixed_count if method.base_optional else len(cfg.models)
    if count < low or (high is not None and count > high):
        wanted = f"exactly {low}" if low == high else f"at least {low}"
        besides = " besides the base" if method.base_optional and cfg.base_model is not None else ""
        raise ValueError(f"models: {cfg.method} merges {wanted} models{besides}, {count} given")
    if method.uses_base and cfg.base_model is None and cfg.method != "slerp":
        raise ValueError(f"base_model: {cfg.method} needs a base model (one of: {', '.join(cfg.names)})")
    if not method.uses_base and not method.base_optional and cfg.base_model is not None:
        raise ValueError(f"base_model: {cfg.method} does not use a base model")
    _check_weights(cfg, method)
    _check_tokenizer(cfg)
    _check_slices(cfg)
    for i, pattern in enumerate(cfg.drop):
        if not pattern:
            raise ValueError(f"drop[{i}]: an empty pattern matches nothing")
    places: list[tuple[tuple[str | int, ...], Override | None]] = [(("parameters",), None)]
    places += [(("overrides", i, "parameters"), o) for i, o in enumerate(cfg.overrides)]
    for loc, override in places:
        try:
            cfg.params_for(override)
        except ValidationError as err:
            raise ValueError(_describe(err, loc)) from None


def _check_weights(cfg: MergeConfig, method: MethodSpec) -> None:
    given = [("weights", cfg.weights)] + [(f"overrides[{i}].weights", o.weights) for i, o in enumerate(cfg.overrides)]
    if not method.takes_weights:
        for key, weights in given + [("weights_from_examples", cfg.weights_from_examples)]:
            if weights is not None:
                raise ValueError(f"{key}: {cfg.method} takes no weights (its parameters say how to mix)")
        return
    count = cfg.mixed_count
    for key, weights in given:
        if weights is None:
            continue
        if len(weights) != count:
            per = "one per model other than the base" if cfg.base_index is not None else "one per model"
            raise ValueError(f"{key}: {len(weights)} given, {cfg.method} needs {count} ({per})")
        if cfg.method == "linear" and cfg.params_for(None).normalize and math.fsum(weights) == 0:
            raise ValueError(f"{key}: the weights sum to 0, so they cannot be normalized")
    _check_negative(cfg, given)
    examples = cfg.weights_from_examples
    if examples is None:
        return
    if cfg.weights is not None:
        raise ValueError("weights_from_examples: give either weights or weights_from_examples, not both")
    if cfg.method != "linear":
        raise ValueError("weights_from_examples: only the linear method (LM-Cocktail) takes weights from examples")
    for name, weight in examples.fixed.items():
        if name not in cfg.names:
            raise ValueError(f"weights_from_examples.fixed: no model named {name!r} (models: {', '.join(cfg.names)})")
        if not 0 <= weight <= 1:
            raise ValueError(f"weights_from_examples.fixed.{name}: {weight} is not within [0, 1]")
    if len(examples.fixed) >= len(cfg.models):
        raise ValueError("weights_from_examples.fixed: at least one model must get its weight from the examples")
    if examples.workers > 1 and examples.device_map is not None:
        raise ValueError("weights_from_examples.workers: partitioned workers and device_map are two ways to spread a "
                         "candidate; give one")
    if math.fsum(examples.fixed.values()) > 1:
        raise ValueError("weights_from_examples.fixed: the fixed weights sum to more than 1")


def _check_tokenizer(cfg: MergeConfig) -> None:
    spec = cfg.tokenizer
    if spec is None:
        return
    if cfg.vocab_policy == "truncate":
        raise ValueError("tokenizer: vocab_policy: truncate and tokenizer are two ways to merge differing "
                         "vocabularies; give one")
    if spec.source not in ("union", "base") and spec.source not in cfg.names:
        raise ValueError(f"tokenizer.source: {spec.source!r} is not 'union', 'base' or a model's name "
                         f"(models: {', '.join(cfg.names)})")
    if spec.source == "union" and spec.tokens_default is not None:
        raise ValueError("tokenizer.tokens_default: source union merges each token over the models that have "
                         "it and needs no default; give tokens_default with source base or a model's name")
    if spec.source != "union" and spec.tokens_default is None:
        raise ValueError("tokenizer.tokens_default: say which row a model lacking a token of the output's "
                         "tokenizer contributes: zero, mean or base")
    if cfg.output.copy_files_from is not None:
        raise ValueError("output.copy_files_from: with tokenizer set, the output's tokenizer and config come "
                         "from tokenizer.source")


# Settings that mix, remap or pick among the inputs' tensors: passthrough copies each from the one model
# its slice (or mergekit's rule for the non-layer tensors) names, so each would be silently ignored.
_NOT_WITH_SLICES = {
    "overrides": "has no parameters to override",
    "tokenizer": "copies the embeddings of one model, so it cannot remap vocabularies",
    "vocab_policy": "copies the embeddings of one model, so it has no vocabularies to truncate",
    "integer_tensors_from": "copies every tensor, integer ones too, from the model its slice names",
    "output.copy_files_from": "writes the config and tokenizer of slices[0]'s model, whose embeddings it has",
}


def _check_slices(cfg: MergeConfig) -> None:
    if cfg.method != "passthrough":
        if cfg.slices is not None:
            raise ValueError(f"slices: only passthrough takes layer slices; {cfg.method} merges whole models")
        return
    if not cfg.slices:
        raise ValueError("slices: passthrough assembles the output from layer slices; give at least one, "
                         "e.g. slices: [{sources: [{model: NAME, layer_range: [0, 4]}]}]")
    given = {"overrides": bool(cfg.overrides), "tokenizer": cfg.tokenizer is not None,
             "vocab_policy": cfg.vocab_policy != "error", "integer_tensors_from": cfg.integer_tensors_from is not None,
             "output.copy_files_from": cfg.output.copy_files_from is not None}
    for key, why in _NOT_WITH_SLICES.items():
        if given[key]:
            raise ValueError(f"{key}: not with passthrough, which {why}")
    for i, piece in enumerate(cfg.slices):
        if len(piece.sources) > 1:
            raise ValueError(f"slices[{i}].sources: {len(piece.sources)} given; passthrough copies each slice from "
                             "one model (mixing a slice's sources, as mergekit's other methods do, is not supported)")
        source = piece.sources[0]
        if source.model not in cfg.names:
            raise ValueError(f"slices[{i}].sources[0].model: no model named {source.model!r} "
                             f"(models: {', '.join(cfg.names)})")
        start, end = source.layer_range
        if start >= end:
            raise ValueError(f"slices[{i}].sources[0].layer_range: [{start}, {end}] holds no layer; give "
                             "[start, end] with start < end (end is not included)")
    used = {piece.sources[0].model for piece in cfg.slices}
    for i, name in enumerate(cfg.names):
        if name not in used:
            raise ValueError(f"models[{i}]: '{name}' is in no slice; passthrough copies only from the models its "
                             "slices name")


def _check_negative(cfg: MergeConfig, given: list[tuple[str, list[float] | None]]) -> None:
    """A negative linear weight extrapolates away from that model: refused unless asked for by name.
    (Task vectors may be negative by design: subtracting a skill.)"""
    if cfg.method != "linear":
        return
    overrides = [None] + list(cfg.overrides)
    for (key, weights), override in zip(given, overrides, strict=True):
        negative = [(name, w) for name, w in zip(cfg.names, weights or [], strict=False) if w < 0]
        if negative and not cfg.params_for(override).allow_negative_weights:
            name, w = negative[0]
            where = "parameters" if override is None else key.replace(".weights", ".parameters")
            raise ValueError(
                f"{key}: model '{name}' has a negative weight ({w}), which extrapolates away from it; "
                f"set {where}.allow_negative_weights: true if that is intended"
            )
