"""Preflight: find what would make a training run fail, on the driver, before any worker starts.

A bad path or an impossible connection otherwise surfaces minutes later, on every worker at once,
after the cluster has been scheduled and the anchor half loaded. Everything here reads only small
files (model configs, safetensors headers, tokenizer files, the data) and never loads weights.
Each problem raises ConfigError naming the config key and the path or value at fault.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from calm_dist.errors import CompositionError
from calm_dist.model.architectures import DECODER_LAYERS, ModelDims, dims_from_config
from calm_dist.model.connections import Connection
from calm_dist.model.cross_attention import CrossAttention
from launcher.train_config import ConfigError, ModelSpec, TrainConfig
from launcher.weight_files import check_weights

ADDRESS_TIMEOUT_S = 3.0

# Files of which a tokenizer folder holds at least one. transformers 5 builds an empty tokenizer from
# a bare GPT-2 config without complaint, so a successful AutoTokenizer load alone proves nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")

# Ports meant when an address names none: Ray Client, the dashboard behind http(s), the GCS.
DEFAULT_PORTS = {"ray": 10001, "http": 80, "https": 443, "": 6379}


@dataclass(frozen=True)
class PreflightReport:
    """What the run will build, as read from the configs of the models and the data."""

    anchor: ModelDims
    augmenting: tuple[ModelDims, ...]
    connections: tuple[Connection, ...]
    num_heads: int
    composition_parameters: int
    anchor_parameters: int  # from the safetensors headers
    train_records: int
    eval_records: int | None
    placement: str
    total_workers: int
    own_tokenizers: tuple[int | None, ...] = ()  # per augmenting model: its own tokenizer's size, or None


def preflight(config: TrainConfig, *, address_timeout: float = ADDRESS_TIMEOUT_S) -> PreflightReport:
    """Check everything a run needs that the config alone cannot show; ConfigError on the first problem."""
    _check_deepspeed(config)
    anchor = _read_model(config.models.anchor, "models.anchor.path")
    augmenting = [
        _read_model(spec, f"models.augmenting.{k}.path") for k, spec in enumerate(config.models.augmenting)
    ]
    for k, (spec, dims) in enumerate(zip(config.models.augmenting, augmenting, strict=True)):
        if dims.vocab_size != anchor.vocab_size and spec.tokenizer is None:
            raise ConfigError(
                f"models.augmenting.{k}.path: {spec.path} has a vocabulary of {dims.vocab_size} tokens but the "
                f"anchor (models.anchor.path: {config.models.anchor.path}) has {anchor.vocab_size}: "
                "composition needs models that share a tokenizer"
            )
    anchor_parameters = check_weights(config.models.anchor.path, "models.anchor.path",
                                      config.models.anchor.trust_remote_code, safetensors_only=True)
    for k, spec in enumerate(config.models.augmenting):
        check_weights(spec.path, f"models.augmenting.{k}.path", spec.trust_remote_code)
    anchor_tokenizer = _check_tokenizer(config, anchor)
    connections = resolve_connections(config, anchor, augmenting)
    num_heads = _check_heads(config, anchor)
    records = _records(config, "train", anchor_tokenizer)
    train_records = len(records)
    own_tokenizers = _check_own_tokenizers(config, augmenting, anchor_tokenizer, records)
    if train_records < config.training.global_batch_size:
        raise ConfigError(
            f"data.train: {config.data.train} has {train_records} records, fewer than "
            f"training.global_batch_size={config.training.global_batch_size} (one optimizer step)"
        )
    eval_records = len(_records(config, "eval", anchor_tokenizer)) if config.data.eval is not None else None
    total_workers = _check_workers(config)
    if config.ray.address is not None and config.ray.address not in ("auto", "local"):
        # "auto" finds a cluster on this machine through Ray's own files and "local" starts one: no
        # host and port to try.
        check_reachable(config.ray.address, timeout=address_timeout)
    from launcher.plan.command import check_fits

    check_fits(config)  # a config that cannot fit the known device memory, named by its largest term
    width = anchor.hidden_size
    return PreflightReport(
        anchor=anchor,
        augmenting=tuple(augmenting),
        connections=tuple(connections),
        num_heads=num_heads,
        composition_parameters=sum(
            CrossAttention.parameter_count(augmenting[c.augmenting].hidden_size, width, num_heads,
                                           config.composition.recency_bias)
            for c in connections
        ),
        anchor_parameters=anchor_parameters,
        train_records=train_records,
        eval_records=eval_records,
        placement=config.placement.mode,
        total_workers=total_workers,
        own_tokenizers=tuple(own_tokenizers),
    )


# --------------------------------------------------------------------------------------------------
# Models and tokenizer


def _read_model(spec: ModelSpec, key: str) -> ModelDims:
    from transformers import AutoConfig

    path = Path(spec.path)
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder" if path.exists() else f"{key}: {path}: no such folder")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {path} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        # transformers' messages run to paragraphs of upgrade advice; the first line says what is wrong.
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(f"{key}: {path}/config.json cannot be read: {first_line}") from None
    if config.model_type not in DECODER_LAYERS:
        raise ConfigError(
            f"{key}: {path} is a {config.model_type!r} model, not a supported architecture "
            f"(supported: {', '.join(sorted(DECODER_LAYERS))}; a new decoder family is usually one line in "
            "calm_dist.model.architectures.DECODER_LAYERS)"
        )
    if not _weight_files(path):
        raise ConfigError(
            f"{key}: {path} has a config.json but no weights (*.safetensors or pytorch_model*.bin)"
        )
    return dims_from_config(config)


def _weight_files(path: Path) -> list[Path]:
    return sorted([*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")])


def _load_tokenizer(key: str, folder: Path, hint: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder}: no such folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}){hint}")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # tokenizers fail in many types; all mean this folder cannot be used
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"{key}: the tokenizer in {folder} cannot be loaded: {type(err).__name__}: "
                          f"{first_line}") from None


def _check_tokenizer(config: TrainConfig, anchor: ModelDims):
    if config.models.tokenizer is not None:
        key, folder, hint = "models.tokenizer", Path(config.models.tokenizer), ""
    else:
        key, folder = "models.anchor.path", Path(config.models.anchor.path)
        hint = "; set models.tokenizer to the folder that has them"
    tokenizer = _load_tokenizer(key, folder, hint, config.models.anchor.trust_remote_code)
    if len(tokenizer) > anchor.vocab_size:
        # Ids past the embedding table crash every worker at the first batch.
        raise ConfigError(
            f"{key}: the tokenizer in {folder} has {len(tokenizer)} tokens but the anchor "
            f"(models.anchor.path: {config.models.anchor.path}) has a vocabulary of {anchor.vocab_size}"
        )
    return tokenizer


# Texts of the training data on which each own tokenizer must split words before whitespace for good.
STABILITY_SAMPLES, STABILITY_CHARS = 16, 400


def _check_own_tokenizers(config: TrainConfig, augmenting: list[ModelDims], anchor_tokenizer, records) -> list[int | None]:
    """Tokenizers of augmenting models that read the text: loadable, fast (offsets), the model's size,
    and never re-tokenizing settled words of the training data (calm_dist.model.alignment)."""
    from calm_dist.model.alignment import (
        AlignmentError,
        check_whitespace_stable,
        require_offsets,
        uninformative_ids,
    )

    sizes: list[int | None] = []
    unknown_ids: list[int] = []
    data = config.data
    fields = [data.text_field] if data.text_field else [data.prompt_field, data.completion_field]
    texts = ["".join(str(records[i][f] or "") for f in fields)[:STABILITY_CHARS]
             for i in range(min(STABILITY_SAMPLES, len(records)))]
    for k, (spec, dims) in enumerate(zip(config.models.augmenting, augmenting, strict=True)):
        if spec.tokenizer is None:
            sizes.append(None)
            continue
        key = f"models.augmenting.{k}.tokenizer"
        tokenizer = _load_tokenizer(key, Path(spec.tokenizer), "", spec.trust_remote_code)
        if len(tokenizer) > dims.vocab_size:
            raise ConfigError(f"{key}: the tokenizer in {spec.tokenizer} has {len(tokenizer)} tokens but the model "
                              f"(models.augmenting.{k}.path: {spec.path}) has a vocabulary of {dims.vocab_size}")
        try:
            require_offsets(anchor_tokenizer, "anchor")
            require_offsets(tokenizer, f"augmenting model {k}")
            for i, text in enumerate(texts):
                check_whitespace_stable(tokenizer, text, where=f"record {i} of {data.train}")
        except AlignmentError as err:
            raise ConfigError(f"{key}: {err}") from None
        sizes.append(len(tokenizer))
        if uninformative_ids(tokenizer):
            unknown_ids.append(k)
    if config.composition.hide_unknown_tokens and not unknown_ids:
        raise ConfigError(
            "composition.hide_unknown_tokens: no augmenting model has a tokenizer of its own "
            "(models.augmenting.N.tokenizer) with an unknown token apart from its bos, eos and pad tokens: "
            "there is nothing to hide"
        )
    return sizes


# --------------------------------------------------------------------------------------------------
# Composition


def resolve_connections(config: TrainConfig, anchor: ModelDims, augmenting: list[ModelDims]) -> list[Connection]:
    """The connections the workers will build (the same function computes them there), in the composed
    model's order, validated against the layer counts."""
    key = "composition.connections" if config.composition.connections is not None else "composition.every_n"
    try:
        connections = config.composition.layout(anchor.num_layers, [d.num_layers for d in augmenting])
    except CompositionError as err:
        raise ConfigError(f"{key}: {err}") from None
    return sorted(connections)


def _check_heads(config: TrainConfig, anchor: ModelDims) -> int:
    num_heads = config.composition.num_heads or anchor.num_heads
    if anchor.hidden_size % num_heads:
        given = "" if config.composition.num_heads else " (default: the anchor's attention head count)"
        raise ConfigError(
            f"composition.num_heads{given}: {num_heads} heads do not divide the anchor's hidden size "
            f"{anchor.hidden_size} (models.anchor.path: {config.models.anchor.path})"
        )
    return num_heads


# --------------------------------------------------------------------------------------------------
# Data, workers, DeepSpeed


def _records(config: TrainConfig, which: str, tokenizer):
    from calm_dist.data.records import DataError, check_fields, load_records

    path = getattr(config.data, which)
    data = config.data
    try:
        # data.split picks a split of a saved DatasetDict for training; an eval folder is read at its
        # default split.
        records = load_records(path, data.split if which == "train" else None)
        check_fields(records, path, text_field=data.text_field, prompt_field=data.prompt_field,
                     completion_field=data.completion_field,
                     keep_anchor_field=data.keep_anchor_field if which == "train" else None)
        _check_something_to_predict(config, records, tokenizer, path)
    except DataError as err:
        raise ConfigError(f"data.{which}: {err}") from None
    return records


def _check_something_to_predict(config: TrainConfig, records, tokenizer, path: str, chunk: int = 256) -> None:
    """ConfigError unless at least one record keeps a token to predict after truncation to
    data.max_length, decided by the workers' own tokenization. It stops at the first chunk that has
    one, so a usable data set costs one chunk however large it is."""
    from calm_dist.data.tokenization import NothingToPredict, tokenize_records

    data = config.data
    for start in range(0, len(records), chunk):
        try:
            tokenize_records(records.select(range(start, min(start + chunk, len(records)))), tokenizer,
                             max_length=data.max_length, text_field=data.text_field,
                             prompt_field=data.prompt_field, completion_field=data.completion_field)
            return
        except NothingToPredict:
            continue
    raise ConfigError(
        f"data.max_length: {data.max_length} tokens leave no record of {path} a token to predict (each loses "
        "its completion or all but one token to truncation); raise data.max_length"
    )


def _check_workers(config: TrainConfig) -> int:
    """Workers the run asks Ray for; on the embedded cluster, GPUs must exist on this machine."""
    anchor_workers = config.ray.num_workers
    if config.placement.mode == "pipelined":
        total = anchor_workers + config.placement.augmenting_workers
        asked = (f"ray.num_workers + placement.augmenting_workers = {anchor_workers} + "
                 f"{config.placement.augmenting_workers} = {total} workers (placement.mode: pipelined)")
    else:
        total, asked = anchor_workers, f"ray.num_workers = {anchor_workers} workers"
    if config.ray.use_gpu and config.ray.address is None:
        import torch

        # Ray would not fail here: it would wait forever for GPUs the embedded cluster lacks.
        available = torch.cuda.device_count()
        if available < total:
            raise ConfigError(
                f"ray.use_gpu: {asked} need one GPU each, but the embedded Ray cluster (ray.address not set) "
                f"has this machine's {available}; set ray.address to a cluster, or lower the worker counts"
            )
    return total


def _check_deepspeed(config: TrainConfig) -> None:
    stage = config.deepspeed.zero_stage
    if config.deepspeed.offload_params and stage != 3:
        raise ConfigError(f"deepspeed.offload_params: parameter offload needs deepspeed.zero_stage 3, not {stage}")
    if config.deepspeed.offload_optimizer and stage == 0:
        raise ConfigError("deepspeed.offload_optimizer: optimizer offload needs deepspeed.zero_stage 1, 2 or 3")


# --------------------------------------------------------------------------------------------------
# The cluster address


def parse_address(address: str) -> tuple[str, int]:
    """Host and port of `ray://host:port`, `http(s)://host:port` or `host:port`; the scheme's usual
    port when none is given (Ray Client 10001, http 80, https 443, a bare host: the GCS's 6379)."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(f"ray.address: {address!r} has scheme {parts.scheme!r}; use ray://, http://, "
                          "https:// or host:port")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.path not in ("", "/"):
        raise ConfigError(f"ray.address: {address!r} is not an address of the form ray://HOST:PORT, "
                          "http://HOST:PORT or HOST:PORT")
    return parts.hostname, port if port is not None else DEFAULT_PORTS[parts.scheme]


def check_reachable(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """ConfigError unless a TCP connection to the address opens within `timeout` seconds."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        if isinstance(err, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise ConfigError(f"ray.address: cannot reach {host}:{port} ({reason}); is the cluster up, and is "
                          "this its Ray Client (10001), dashboard (8265) or GCS (6379) port?") from None


# --------------------------------------------------------------------------------------------------
# The summary


def describe(report: PreflightReport) -> str:
    """A few lines on what is about to train, printed before the workers start."""

    def model(dims: ModelDims) -> str:
        return (f"{dims.model_type}, {dims.num_layers} layers x {dims.hidden_size} wide, {dims.num_heads} heads, "
                f"vocabulary {dims.vocab_size:,}")

    lines = [f"anchor:        {model(report.anchor)}"
             + (f", {report.anchor_parameters:,} parameters" if report.anchor_parameters else "")]
    for k, dims in enumerate(report.augmenting):
        pairs = ", ".join(f"{c.aug_layer}->{c.anchor_layer}" for c in report.connections if c.augmenting == k)
        own = report.own_tokenizers[k] if k < len(report.own_tokenizers) else None
        reads = f", its own tokenizer ({own:,} tokens)" if own is not None else ""
        lines.append(f"augmenting {k}:  {model(dims)}{reads}")
        lines.append(f"  connections (its layer -> anchor layer): {pairs}")
    share = (f" ({100 * report.composition_parameters / report.anchor_parameters:.2f}% of the anchor)"
             if report.anchor_parameters else "")
    lines.append(f"composition:   {len(report.connections)} cross-attention blocks, {report.num_heads} heads, "
                 f"{report.composition_parameters:,} trainable parameters{share}")
    data = f"{report.train_records:,} train records"
    if report.eval_records is not None:
        data += f", {report.eval_records:,} eval records"
    lines.append(f"data:          {data}")
    lines.append(f"workers:       {report.total_workers} ({report.placement})")
    return "\n".join(lines)
