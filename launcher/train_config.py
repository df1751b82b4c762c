"""The training config: one YAML file, validated by pydantic before anything starts.

Unknown keys and wrong types fail with the key's dotted path (e.g. `training.micro_batch_size`).
Relative paths in the file are resolved against the file's own folder, so a config can be run from
anywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calm_dist.errors import InputError
from calm_dist.model import connections
from calm_dist.model.connections import Connection

if TYPE_CHECKING:  # torch, which the options hold dtypes of, loads only when a run needs it
    from calm_dist.model.options import CompositionOptions


class ConfigError(InputError):
    """A config that cannot run; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# float16 is not offered: partitioned loading and the composition's optimizer run without loss scaling,
# which fp16 training needs; bfloat16 has fp32's range.
Dtype = Literal["float32", "bfloat16"]


class ModelSpec(Strict):
    path: str = Field(description="a local Hugging Face model folder")
    dtype: Dtype = "bfloat16"
    trust_remote_code: bool = False
    tokenizer: str | None = Field(
        None, description="augmenting models only: the folder of the model's own tokenizer (often its path), "
        "to compose across tokenizers; default: the model reads the anchor's tokens"
    )


class ModelsConfig(Strict):
    anchor: ModelSpec
    augmenting: list[ModelSpec] = Field(min_length=1)
    tokenizer: str | None = Field(None, description="tokenizer folder; default: the anchor's folder")

    @model_validator(mode="after")
    def _anchor_tokenizer_in_one_place(self) -> ModelsConfig:
        if self.anchor.tokenizer is not None:
            raise ValueError("models.anchor.tokenizer: the anchor's tokenizer is models.tokenizer")
        return self


class CompositionConfig(Strict):
    every_n: int | None = Field(
        None, ge=1, description="connect every n-th augmenting layer (paper: 4, the default without connections)"
    )
    connections: list[tuple[int, int, int]] | None = Field(
        None, description="explicit [augmenting model, augmenting layer, anchor layer] triples; anchor layer -1 "
        "is the anchor's input embeddings"
    )
    num_heads: int | None = Field(None, ge=1, description="default: the anchor's head count")
    recency_bias: bool = Field(
        False, description="learned per-head penalties on how far back an augmenting token is (ALiBi-like); "
        "not in the paper, whose cross-attention has no notion of position"
    )
    null_attention: bool = Field(
        False, description="a zero key and value every query may attend to, so that the cross-attention can "
        "add nothing where the augmenting model has nothing to add; not in the paper"
    )
    residual_scale: bool = Field(
        False, description="scale each cross-attention output by the RMS of the anchor state it joins, so it "
        "learns as fast on a real anchor (residual RMS 10-30) as on a toy (near 1); not in the paper"
    )
    hide_unknown_tokens: bool = Field(
        False, description="augmenting tokens that are their own tokenizer's unknown token (<unk>: text the "
        "augmenting model has no word for) or bos token are hidden from the cross-attention, which then reads "
        "only text the augmenting model knows; for augmenting models with a tokenizer of their own; not in the paper"
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="training only: drop this share of the augmenting states the cross-attention "
        "reads (a regulariser against memorising D_C; decoding, eval and checkpoints are unaffected); not in the paper"
    )
    dtype: Dtype = "float32"

    @model_validator(mode="before")
    @classmethod
    def _paper_default(cls, data):
        # The default lives here rather than on the field, so that a validated config dumped and validated
        # again (as Ray workers receive it) holds exactly one layout.
        if isinstance(data, dict) and data.get("connections") is None and "every_n" not in data:
            data = {**data, "every_n": 4}
        return data

    @model_validator(mode="after")
    def _one_layout(self) -> CompositionConfig:
        # `every_n: null` next to connections just says the same thing twice.
        if self.connections is not None and self.every_n is not None:
            raise ValueError("give either every_n or connections, not both")
        if self.connections is None and self.every_n is None:
            raise ValueError("give every_n or connections: with neither, nothing connects the models")
        return self

    def options(self) -> CompositionOptions:
        """The options every composition reads (compose, checkpoints, workers): all fields but the layout."""
        import torch

        from calm_dist.model.options import CompositionOptions

        values = self.model_dump(exclude={"every_n", "connections"})
        return CompositionOptions(**{**values, "dtype": getattr(torch, self.dtype)})

    def layout(self, anchor_layers: int, augmenting_layers: Sequence[int]) -> list[Connection]:
        """The connections, validated against the models' layer counts."""
        return connections.layout(self.connections, self.every_n, anchor_layers, augmenting_layers)


class DataConfig(Strict):
    train: str
    eval: str | None = None
    split: str | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    keep_anchor_field: str | None = Field(None, description=(
        "a true/false field of the training records: where true, the record's tokens are trained to keep "
        "the anchor's own next-token distribution (KL to the anchor alone) instead of their labels; for "
        "ordinary text, where the augmenting models have nothing to add"))
    max_length: int = Field(512, ge=2)

    @model_validator(mode="after")
    def _one_mode(self) -> DataConfig:
        pair = self.prompt_field is not None or self.completion_field is not None
        if self.text_field is not None and pair:
            raise ValueError("give text_field, or prompt_field and completion_field, not both")
        if self.text_field is None and (self.prompt_field is None or self.completion_field is None):
            raise ValueError("give text_field, or both prompt_field and completion_field")
        return self


class OptimizerConfig(Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)


class ScheduleConfig(Strict):
    kind: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainingConfig(Strict):
    steps: int = Field(ge=1, description="optimizer steps")
    micro_batch_size: int = Field(ge=1, description="sequences per anchor worker per forward")
    global_batch_size: int = Field(ge=1, description="sequences per optimizer step, all workers together")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    eval_samples: int = Field(64, ge=1)
    eval_max_new_tokens: int = Field(32, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="default: only at the end")
    seed: int = 0
    keep_anchor_weight: float = Field(1.0, gt=0, description="with data.keep_anchor_field: the KL term's weight "
                                      "against the other records' cross-entropy, each a mean over its own tokens")


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        3, description="3: the frozen anchor is partitioned over the workers; 0-2: each worker holds it whole "
        "(no gathering per step: for anchors that fit one device)")
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    extra: dict = Field(default_factory=dict, description="merged into the generated DeepSpeed config")


class PlacementConfig(Strict):
    mode: Literal["colocated", "pipelined"] = "colocated"
    augmenting_workers: int = Field(1, ge=1, description="pipelined: ranks that run only the augmenting models")
    prefetch: int = Field(2, ge=1, description="pipelined: micro-batches the augmenting ranks run ahead")


class RayConfig(Strict):
    address: str | None = Field(None, description="None: start an embedded local cluster on 127.0.0.1")
    num_workers: int = Field(2, ge=1, description="anchor workers (the data-parallel ZeRO group)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    device_memory: str | None = Field(
        None, description="memory of each worker's device, e.g. 80GB: `calm train` refuses a config that cannot fit "
                          "(default: this machine's GPU when use_gpu)")
    storage_path: str = Field(
        "runs", description="where checkpoints go: a local folder, or a URI (s3://bucket/path, gs://..., with "
        "pyarrow's query options such as ?endpoint_override=HOST:PORT); on multi-node clusters, storage every "
        "node reaches")
    max_failures: int = Field(2, ge=0, description="worker deaths to recover from by resuming")
    runtime_env: dict = Field(default_factory=dict)

    @field_validator("storage_path")
    @classmethod
    def _folder_or_uri(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not value.strip():
            raise ValueError("give a folder or a URI (s3://bucket/path)")
        if sep and not (re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) and rest.strip("/")):
            raise ValueError(f"{value!r} is not a URI (scheme://bucket/path) nor a folder")
        return value


class TrainConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    models: ModelsConfig
    composition: CompositionConfig = CompositionConfig()
    data: DataConfig
    training: TrainingConfig
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    placement: PlacementConfig = PlacementConfig()
    ray: RayConfig = RayConfig()
    output_dir: str = Field("runs", description="TensorBoard logs and the exported composition go here")

    @field_validator("name")
    @classmethod
    def _no_latest(cls, value: str) -> str:
        if value == "latest":  # collides with DeepSpeed's own `latest` file
            raise ValueError("'latest' is reserved")
        if value in (".", ".."):  # the run's folders are named after it: this would be their parent
            raise ValueError(f"{value!r} is not a run name: the run's folders are named after it; "
                             "use letters, digits, '_', '-' or '.'")
        return value

    @model_validator(mode="after")
    def _batches_divide(self) -> TrainConfig:
        per_step = self.training.micro_batch_size * self.ray.num_workers
        if self.training.global_batch_size % per_step:
            raise ValueError(
                f"training.global_batch_size={self.training.global_batch_size} is not a multiple of "
                f"training.micro_batch_size x ray.num_workers = {self.training.micro_batch_size} x "
                f"{self.ray.num_workers} = {per_step}"
            )
        return self

    @model_validator(mode="after")
    def _augmenting_ranks_fit(self) -> TrainConfig:
        if self.placement.mode == "pipelined" and self.placement.augmenting_workers > self.ray.num_workers:
            raise ValueError(
                f"placement.augmenting_workers={self.placement.augmenting_workers} exceeds ray.num_workers="
                f"{self.ray.num_workers}: each augmenting worker serves at least one anchor worker"
            )
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.training.global_batch_size // (self.training.micro_batch_size * self.ray.num_workers)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


_PATH_KEYS = [("models", "tokenizer"), ("data", "train"), ("data", "eval"), ("output_dir",), ("ray", "storage_path")]


def _resolve_paths(raw: dict, base: Path) -> None:
    def fix(value):
        if isinstance(value, str) and value and "://" not in value:
            value = os.path.expanduser(value)
            if not os.path.isabs(value):
                return str((base / value).resolve())
        return value

    models = raw.get("models")
    if isinstance(models, dict):
        for spec in [models.get("anchor"), *(models.get("augmenting") or [])]:
            if isinstance(spec, dict):
                for key in ("path", "tokenizer"):
                    if key in spec:
                        spec[key] = fix(spec[key])
    for keys in _PATH_KEYS:
        node = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            node[keys[-1]] = fix(node[keys[-1]])


def describe_override(key: str, value) -> str:
    """How a `--set` override was typed, near enough to find it on the command line."""
    shown = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    shown = shown.removesuffix("\n...").strip()
    return f"--set {key}={shown}"


def blame_overrides(message: str, given: dict[str, str]) -> str:
    """`message` (which starts with the dotted key at fault) with the key's command-line origin named,
    when the key or one of its parents was overridden there rather than set in the file."""
    key = re.match(r"[\w.]+", message)
    if key is None:
        return message
    for dotted, origin in given.items():
        if key.group() == dotted or key.group().startswith(dotted + "."):
            return f"{key.group()} (from {origin} on the command line){message[key.end():]}"
    return message


@contextmanager
def blamed_on_command_line(overrides: dict, given: dict[str, str] | None = None) -> Iterator[None]:
    """A ConfigError raised inside about a key that was overridden names the override."""
    try:
        yield
    except ConfigError as err:
        given = {**{key: describe_override(key, value) for key, value in overrides.items()}, **(given or {})}
        raise ConfigError(blame_overrides(str(err), given)) from None


def format_validation_error(err: ValidationError, source: str, given: dict[str, str] | None = None) -> str:
    """One line per problem, each naming its key; a key set on the command line is blamed there."""
    given = given or {}
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"])
        # Our own validators' messages name their keys: pydantic's "Value error, " prefix adds nothing.
        own = problem["type"] == "value_error" and "error" in problem.get("ctx", {})
        message = str(problem["ctx"]["error"]) if own else problem["msg"]
        line = blame_overrides(f"{where}: {message}", given) if where else message
        if line == f"{where}: {message}" or not where:  # not blamed by key: maybe named in the message
            named = [origin for dotted, origin in given.items() if dotted in message]
            if named:
                line += f" (from {', '.join(named)} on the command line)"
        lines.append(f"  {line}")
    return "\n".join([f"{source}: invalid config", *lines])


def load_config(path: str | os.PathLike, overrides: dict | None = None,
                given: dict[str, str] | None = None) -> TrainConfig:
    """Read, resolve and validate a training config; ConfigError on any problem.

    overrides: dotted key -> value, set over the file's values. given: dotted key -> how the user typed
    it (default `--set KEY=VALUE`), so a bad override is blamed on the command line, not the file.
    """
    given = {**{key: describe_override(key, value) for key, value in (overrides or {}).items()}, **(given or {})}
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:  # a folder, no permission
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for depth, key in enumerate(parents):
            if isinstance(node, list):  # models.augmenting.0.path: an index into a list
                if not (key.isdigit() and int(key) < len(node)):
                    where = ".".join(parents[:depth])
                    raise ConfigError(f"{path}: cannot set {dotted}: {where} has no item {key} "
                                      f"(indices 0..{len(node) - 1})")
                node = node[int(key)]
            else:
                if node.get(key) is None:  # absent, or a section left empty in the file (`ray:`)
                    node[key] = {}
                node = node[key]
            if not isinstance(node, dict | list):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"{path}: cannot set {dotted}: {where} is not a mapping")
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: cannot set {dotted}: {'.'.join(parents)} is a list; give an index")
        node[last] = value
    _resolve_paths(raw, path.resolve().parent)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), given)) from None


def parse_overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs -> {dotted key: YAML-parsed value}; ConfigError on a pair without `=` or a key."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides
