"""The training data pipeline: records from a file, tokens with loss labels, and sharded micro-batches.

Every step is deterministic, so each data-parallel rank can build its own shard independently (no rank
broadcasts data) and a resumed run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.compute
import torch
from transformers import PreTrainedTokenizerBase

from calm_dist.alignment import Aligner, batch_key, collate_views
from calm_dist.errors import InputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens and padding)

# File suffix -> the `datasets` packaged builder that reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(InputError):
    """Training data that cannot be used as asked: a missing or unreadable file, a missing field, a
    resume state from other sharding. The message names the file or setting at fault."""


class NothingToPredict(DataError):
    """No record keeps a token to predict after truncation to max_length."""


# --------------------------------------------------------------------------------------------------
# Records


def load_records(
    path: str | os.PathLike, split: str | None = None, *, cache_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """Records from a JSON Lines / JSON / CSV / Parquet file, or a `save_to_disk` folder.

    Only local files are read, so this works with the Hub unreachable or `HF_DATASETS_OFFLINE=1`.
    Without `cache_dir`, a file's records are held in memory and its Arrow cache goes to a temporary
    folder that is deleted before returning (nothing is written under the user's home); with
    `cache_dir`, the cache is kept there and memory mapped, for files larger than memory. A saved
    folder is always memory mapped in place. `split` picks a split of a saved `DatasetDict` (default
    "train"); a file or a saved single `Dataset` is one split, so `split` must then be None or "train".
    CSV cells are all read as strings, so an answer such as "007" is not turned into the number 7.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _nonempty(_load_saved(path, split), path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown data file extension {path.suffix!r}; use one of {sorted(FORMATS)} "
            "or a folder written by Dataset.save_to_disk"
        )
    if split not in (None, "train"):
        raise DataError(f"{path}: a data file holds a single split; split={split!r} applies only to a "
                        "folder written by DatasetDict.save_to_disk")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    options: dict[str, Any] = {}
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8-sig") as f:  # pandas drops a BOM too
            header = next(csv.reader(f), [])
        options = dict(converters={name: str for name in header}, na_filter=False)
    options.update(data_files=str(path), split="train")
    try:
        if cache_dir is not None:
            dataset = datasets.load_dataset(fmt, cache_dir=str(cache_dir), **options)
        else:
            with tempfile.TemporaryDirectory(prefix="calm-data-") as tmp:
                dataset = datasets.load_dataset(fmt, cache_dir=tmp, keep_in_memory=True, **options)
    except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, UnicodeDecodeError) as err:
        # A file without rows fails deep in `datasets` ("Instruction 'train' corresponds to no data").
        if "corresponds to no data" in str(err):
            raise DataError(f"{path}: no records") from err
        # DatasetGenerationError says only "an error occurred"; the parser's error is its cause.
        cause = err.__cause__ or err
        where = _bad_json_line(path) if fmt == "json" and path.suffix.lower() == ".jsonl" else None
        if where is not None:
            raise DataError(f"{path}: line {where[0]} is not valid JSON: {where[1]}") from err
        raise DataError(f"{path}: cannot be read as {fmt}: {type(cause).__name__}: {_rows_as_lines(path, cause)}") from err
    return _nonempty(dataset, path)


def record_lines(path: str | os.PathLike) -> list[int] | None:
    """The 1-based file line on which each record of a JSON Lines or CSV file starts, as an editor
    numbers them (a CSV's header is line 1); None for other formats, whose records have no lines."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            return [number for number, line in enumerate(f, start=1) if line.strip()]
    if suffix == ".csv":
        starts = []
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            next(reader, None)  # the header
            end = reader.line_num
            for row in reader:
                if row:  # blank lines hold no record (pandas skips them too)
                    starts.append(end + 1)
                end = reader.line_num
        return starts
    return None


def where_is(path: str | os.PathLike, index: int) -> str:
    """Where record `index` (0-based, in file order) lies, in the words a person looks it up with."""
    lines = record_lines(path)
    if lines is not None and 0 <= index < len(lines):
        return f"line {lines[index]}"
    return f"record {index} (counting from 0)"


def _bad_json_line(path: Path) -> tuple[int, str] | None:
    """(1-based line, error) of the first line of a JSON Lines file that is not JSON, if any."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as err:
                    return number, str(err)
    return None


def _rows_as_lines(path: Path, err: BaseException) -> str:
    """A parser's message with its 0-based "row N" turned into the file line it means."""
    return re.sub(r"\bin row (\d+)", lambda m: f"at {where_is(path, int(m.group(1)))}", str(err))


def _load_saved(path: Path, split: str | None) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: a folder but not one written by Dataset.save_to_disk or "
                        "DatasetDict.save_to_disk") from err
    if isinstance(saved, datasets.DatasetDict):
        name = split or "train"
        if name not in saved:
            raise DataError(f"{path}: no split {name!r}; its splits are {sorted(saved)}")
        return saved[name]
    if split not in (None, "train"):
        raise DataError(f"{path}: holds one Dataset, not a DatasetDict; split={split!r} cannot be picked")
    return saved


def _nonempty(dataset: datasets.Dataset, path: Path) -> datasets.Dataset:
    if len(dataset) == 0:
        raise DataError(f"{path}: no records")
    return dataset


def check_fields(
    dataset: datasets.Dataset,
    path: str | os.PathLike,
    *,
    text_field: str | None,
    prompt_field: str | None,
    completion_field: str | None,
) -> None:
    """Checks that exactly one mode is asked for and that its fields exist and hold strings.

    Modes: `text_field` (loss on every token) or `prompt_field` + `completion_field` (loss on the
    completion only).
    """
    if text_field is not None and (prompt_field is not None or completion_field is not None):
        raise DataError(f"{path}: give either text_field ({text_field!r}) or prompt_field + completion_field "
                        f"({prompt_field!r}, {completion_field!r}), not both")
    fields = list(dataset.column_names)
    if text_field is None and (prompt_field is None or completion_field is None):
        if prompt_field is not None or completion_field is not None:
            missing = "completion_field" if prompt_field is not None else "prompt_field"
        else:
            missing = "text_field or prompt_field + completion_field"
        raise DataError(f"{path}: no {missing} given; say which field holds the training text "
                        f"(its fields are {fields})")
    roles = {"text_field": text_field} if text_field is not None else {
        "prompt_field": prompt_field, "completion_field": completion_field}
    for role, field in roles.items():
        if field not in fields:
            raise DataError(f"{path}: no field {field!r} (the {role}); its fields are {fields}")
        feature = dataset.features[field]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DataError(f"{path}: field {field!r} (the {role}) holds {feature}, not text")
        column = dataset.data.column(field)
        if column.null_count:  # Arrow keeps the count: free to ask, and only then is the column scanned
            first = pyarrow.compute.index(pyarrow.compute.is_null(column), True).as_py()
            raise DataError(f"{path}: {where_is(path, first)} has no value (null) in field {field!r} (the {role})")


# --------------------------------------------------------------------------------------------------
# Tokens and labels


def tokenize_records(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    text_field: str | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    add_eos: bool = True,
    aligner: Aligner | None = None,
) -> datasets.Dataset:
    """A dataset of `input_ids` and `labels` (int32 lists), one row per kept record, in record order.

    A sequence is bos + text + eos, or bos + prompt + completion + eos, where bos is the tokenizer's
    bos_token_id if it has one (added here, never by the tokenizer: text is encoded without special
    tokens) and eos is added when `add_eos`. Prompt and completion are encoded separately and
    concatenated, so the loss boundary falls exactly between them. `labels` equal `input_ids`, except
    -100 on bos and the prompt in prompt mode; the model shifts them (position t learns labels[t+1]).
    Sequences longer than `max_length` lose their end. A record left with nothing to predict (its
    completion truncated away, or fewer than two tokens) is dropped, and the number dropped is logged;
    if none is left, DataError. The result is held in memory: nothing is written next to the source.

    With an aligner whose augmenting model k has a tokenizer of its own, each row also holds that
    model's settled tokens of the row's text and, per anchor position, how many it sees
    (`augmenting{k}_input_ids`, `augmenting{k}_visible`; calm_dist.alignment).
    """
    check_fields(dataset, "the dataset", text_field=text_field, prompt_field=prompt_field,
                 completion_field=completion_field)
    if max_length < 2:
        raise DataError(f"max_length={max_length}: a sequence needs at least 2 tokens to predict one")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if add_eos and tokenizer.eos_token_id is None:
        raise DataError("add_eos is set but the tokenizer has no eos token")
    eos = [tokenizer.eos_token_id] if add_eos else []
    fields = [text_field] if text_field is not None else [prompt_field, completion_field]
    cross = aligner.cross if aligner is not None else []
    tokenizers = "" if not cross else str(aligner.identities())

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list[list[int]]]:
        for field in fields:
            for index, value in zip(indices, batch[field], strict=True):
                if value is None:
                    raise DataError(f"record {index} has no value (null) in field {field!r}")
        # verbose=False: the "longer than model_max_length" warning is moot, truncation comes below.
        pieces = [tokenizer(batch[f], add_special_tokens=False, verbose=False)["input_ids"] for f in fields]
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for k in cross:
            out[batch_key(k, "input_ids")], out[batch_key(k, "visible")] = [], []
        for parts in zip(*pieces, strict=True):
            masked = len(bos) + len(parts[0]) if prompt_field is not None else 0
            ids = (bos + [t for part in parts for t in part] + eos)[:max_length]
            labels = [IGNORE_INDEX] * min(masked, len(ids)) + ids[masked:]
            if any(label != IGNORE_INDEX for label in labels[1:]):
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                for k, (aug_ids, visible) in (aligner.align_ids(ids) if cross else {}).items():
                    out[batch_key(k, "input_ids")].append(aug_ids)
                    out[batch_key(k, "visible")].append(visible)
        return out

    token_list = datasets.List(datasets.Value("int32"))
    features = datasets.Features({"input_ids": token_list, "labels": token_list,
                                  **{batch_key(k, name): token_list for k in cross for name in ("input_ids", "visible")}})
    tokenized = dataset.map(
        encode, batched=True, with_indices=True, remove_columns=dataset.column_names, features=features,
        keep_in_memory=True, load_from_cache_file=False, desc="tokenizing",
        # A given fingerprint spares datasets from hashing `encode` (its closure holds the tokenizer),
        # which is slow and, in Ray workers, dumps bytecode into the logs.
        new_fingerprint=hashlib.sha256(
            f"{dataset._fingerprint}/{max_length}/{text_field}/{prompt_field}/{completion_field}/{add_eos}/"
            f"{tokenizer.name_or_path}/{len(tokenizer)}/{tokenizers}".encode()
        ).hexdigest()[:32],
    )
    dropped = len(dataset) - len(tokenized)
    if dropped:
        log.warning("dropped %d of %d records with nothing left to predict after truncation to max_length=%d",
                    dropped, len(dataset), max_length)
    if len(tokenized) == 0:
        raise NothingToPredict(f"no record has a token left to predict after truncation to max_length={max_length}")
    return tokenized


# --------------------------------------------------------------------------------------------------
# Batches


def collate(
    examples: Sequence[Mapping[str, Any]], pad_token_id: int, augmenting_pad_ids: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """Right-pads `input_ids` (and `labels`, with -100) to the longest example; int64 tensors [B, L].

    `labels` are optional (evaluation prompts may have none) but must be given for all examples or none.
    Augmenting tokens of models with a tokenizer of their own (tokenize_records with an aligner) are
    padded with augmenting_pad_ids[k] and come with their attention mask and visibility.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    with_labels = ["labels" in e for e in examples]
    if any(with_labels) and not all(with_labels):
        raise ValueError("some examples have labels and some do not")
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        if with_labels[0]:
            if len(example["labels"]) != n:
                raise ValueError(f"example {row} has {len(example['labels'])} labels for {n} input_ids")
            labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_labels[0]:
        batch["labels"] = labels
    if augmenting_pad_ids:
        batch.update(collate_views(examples, len(augmenting_pad_ids), augmenting_pad_ids, length))
    return batch


class ShardedBatches:
    """Endless micro-batches of one data-parallel rank, identical on every run with the same seed.

    Epoch e visits the records in the order `torch.randperm(n, generator=manual_seed(seed + e))`
    (record order without `shuffle`). That order is cut into global batches of
    micro_batch_size * world_size records, and rank r takes the r-th contiguous micro_batch_size slice
    of each, so at every step the ranks together see exactly one global batch and all ranks take the
    same number of steps per epoch. With `drop_last` the incomplete last global batch is skipped;
    without it, the last global batch is filled up from the start of the same epoch's order (a few
    records seen twice) rather than leaving some ranks short, which would stall collectives.

    The position (epoch, next batch) advances as batches are handed out and is the same on every rank,
    so one rank's `state_dict()` resumes them all.
    """

    def __init__(
        self,
        dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        pad_token_id: int,
        shuffle: bool = True,
        drop_last: bool = True,
        augmenting_pad_ids: Sequence[int] = (),
    ):
        if micro_batch_size < 1 or world_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} and world_size={world_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.augmenting_pad_ids = list(augmenting_pad_ids)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_samples = len(dataset)
        global_batch = micro_batch_size * world_size
        self.batches_per_epoch = (
            self.num_samples // global_batch if drop_last else -(-self.num_samples // global_batch)
        )
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.num_samples} records do not fill one global batch of {global_batch} "
                f"(micro_batch_size={micro_batch_size} x world_size={world_size}) and drop_last is set"
            )
        self.epoch = 0
        self.next_batch = 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its record order), built once per epoch

    @property
    def samples_per_epoch(self) -> int:
        """Records this rank sees per epoch."""
        return self.batches_per_epoch * self.micro_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Record indices in the order all ranks together visit them in `epoch`."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=generator)
            else:
                order = torch.arange(self.num_samples)
            self._order = (epoch, order)
        return self._order[1]

    def batch_indices(self, epoch: int, batch: int) -> list[int]:
        """Record indices of this rank's micro-batch `batch` of `epoch`. Another rank's (an augmenting
        worker preparing an anchor rank's inputs, say) come from a ShardedBatches built with its rank."""
        start = batch * self.micro_batch_size * self.world_size + self.rank * self.micro_batch_size
        positions = torch.arange(start, start + self.micro_batch_size) % self.num_samples
        return self.epoch_order(epoch)[positions].tolist()

    def _examples(self, indices: list[int]) -> list[Mapping[str, Any]]:
        if isinstance(self.dataset, datasets.Dataset):
            # One Arrow read per batch rather than one per record, of the columns collate uses.
            wanted = [c for c in self.dataset.column_names if c in ("input_ids", "labels") or c.startswith("augmenting")]
            columns = self.dataset.select_columns(wanted)[indices]
            rows = zip(*columns.values(), strict=True)
            return [dict(zip(columns, values, strict=True)) for values in rows]
        return [self.dataset[i] for i in indices]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            indices = self.batch_indices(self.epoch, self.next_batch)
            # Advance before yielding: once a batch is handed out, state_dict() points past it.
            self.next_batch += 1
            if self.next_batch == self.batches_per_epoch:
                self.epoch, self.next_batch = self.epoch + 1, 0
            yield collate(self._examples(indices), self.pad_token_id, self.augmenting_pad_ids)

    def state_dict(self) -> dict[str, int]:
        """The next micro-batch to be yielded, and the sharding it belongs to."""
        return {
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "seed": self.seed,
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        # Resuming under other sharding or other data would silently repeat or skip records.
        required = ("epoch", "next_batch", "seed", "world_size", "micro_batch_size")
        missing = [key for key in required if key not in state]
        if missing:
            raise DataError(f"cannot resume the data position: the saved state lacks {missing}")
        for key in ("seed", "world_size", "micro_batch_size", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the data position: it was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; resume with the same data and sharding, or start afresh"
                )
        if not 0 <= state["next_batch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise DataError(f"cannot resume the data position epoch={state['epoch']}, next_batch="
                            f"{state['next_batch']}: an epoch has {self.batches_per_epoch} batches")
        self.epoch = state["epoch"]
        self.next_batch = state["next_batch"]
