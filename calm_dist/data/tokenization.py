"""Records to tokens with loss labels: bos + text + eos, or a prompt whose tokens the loss skips
followed by its completion; deterministic, so every rank tokenizes alike."""

from __future__ import annotations

import hashlib
import logging

import datasets
from transformers import PreTrainedTokenizerBase

from calm_dist.data.records import DataError, check_fields
from calm_dist.model.alignment import Aligner, batch_key
from calm_dist.model.objectives import IGNORE_INDEX  # the label the loss skips (prompt tokens and padding)

log = logging.getLogger(__name__)



class NothingToPredict(DataError):
    """No record keeps a token to predict after truncation to max_length."""


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
    keep_anchor_field: str | None = None,
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
    (`augmenting{k}_input_ids`, `augmenting{k}_visible`; calm_dist.model.alignment).

    With `keep_anchor_field`, each row also holds `keep_anchor`: its record's value of that field (a
    missing value: False), which trains the row to keep the anchor's predictions
    (calm_dist.model.objectives).
    """
    check_fields(dataset, "the dataset", text_field=text_field, prompt_field=prompt_field,
                 completion_field=completion_field, keep_anchor_field=keep_anchor_field)
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
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for k in cross:
            out[batch_key(k, "input_ids")], out[batch_key(k, "visible")] = [], []
        keeps = batch[keep_anchor_field] if keep_anchor_field is not None else [None] * len(indices)
        if keep_anchor_field is not None:
            out["keep_anchor"] = []
        for keep, parts in zip(keeps, zip(*pieces, strict=True), strict=True):
            masked = len(bos) + len(parts[0]) if prompt_field is not None else 0
            ids = (bos + [t for part in parts for t in part] + eos)[:max_length]
            labels = [IGNORE_INDEX] * min(masked, len(ids)) + ids[masked:]
            if any(label != IGNORE_INDEX for label in labels[1:]):
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                if keep_anchor_field is not None:
                    out["keep_anchor"].append(bool(keep))
                for k, (aug_ids, visible) in (aligner.align_ids(ids) if cross else {}).items():
                    out[batch_key(k, "input_ids")].append(aug_ids)
                    out[batch_key(k, "visible")].append(visible)
        return out

    token_list = datasets.List(datasets.Value("int32"))
    features = datasets.Features({"input_ids": token_list, "labels": token_list,
                                  **{batch_key(k, name): token_list for k in cross for name in ("input_ids", "visible")},
                                  **({"keep_anchor": datasets.Value("bool")} if keep_anchor_field is not None else {})})
    tokenized = dataset.map(
        encode, batched=True, with_indices=True, remove_columns=dataset.column_names, features=features,
        keep_in_memory=True, load_from_cache_file=False, desc="tokenizing",
        # A given fingerprint spares datasets from hashing `encode` (its closure holds the tokenizer),
        # which is slow and, in Ray workers, dumps bytecode into the logs.
        new_fingerprint=hashlib.sha256(
            f"{dataset._fingerprint}/{max_length}/{text_field}/{prompt_field}/{completion_field}/{keep_anchor_field}/{add_eos}/"
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
