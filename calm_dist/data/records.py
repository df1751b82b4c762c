"""Records from a file (JSON Lines, JSON, CSV, Parquet, a saved dataset): loading, where a record
lives in its file, and the fields a run needs. Only local files are read."""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.compute

from calm_dist.errors import InputError

# File suffix -> the `datasets` packaged builder that reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(InputError):
    """Training data that cannot be used as asked: a missing or unreadable file, a missing field, a
    resume state from other sharding. The message names the file or setting at fault."""


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
    keep_anchor_field: str | None = None,
) -> None:
    """Checks that exactly one mode is asked for and that its fields exist and hold strings.

    Modes: `text_field` (loss on every token) or `prompt_field` + `completion_field` (loss on the
    completion only). `keep_anchor_field`, in either mode, holds true/false (a record without it: false).
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
    if keep_anchor_field is not None:
        if keep_anchor_field not in fields:
            raise DataError(f"{path}: no field {keep_anchor_field!r} (the keep_anchor_field); its fields are {fields}")
        feature = dataset.features[keep_anchor_field]
        if not (isinstance(feature, datasets.Value) and feature.dtype == "bool"):
            raise DataError(f"{path}: field {keep_anchor_field!r} (the keep_anchor_field) holds {feature}, "
                            "not true/false")
