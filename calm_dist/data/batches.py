"""Tokenized records to micro-batches: padding (collate) and each data-parallel rank's endless,
resumable shard (ShardedBatches), identical on every run with the same seed, so no rank broadcasts data
and a resumed run sees exactly the batches the interrupted one would have seen."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import torch

from calm_dist.data.records import DataError
from calm_dist.data.tokenization import IGNORE_INDEX
from calm_dist.model.alignment import collate_views

# What a saved data position is only valid under: resuming under other sharding or other data would
# silently repeat or skip records.
_SHARDING = ("seed", "world_size", "micro_batch_size", "num_samples")


def check_data_position(state: Mapping[str, int], run: Mapping[str, int]) -> None:
    """Raise DataError unless the saved data position `state` can be resumed by a run sharded as `run`
    (a subset of seed, world_size, micro_batch_size, num_samples: the driver checks what it knows before
    any worker starts, the workers check all of it)."""
    missing = [key for key in ("epoch", "next_batch", "seed", "world_size", "micro_batch_size") if key not in state]
    if missing:
        raise DataError(f"cannot resume the data position: the saved state lacks {missing}")
    for key in _SHARDING:
        if key in state and key in run and state[key] != run[key]:
            raise DataError(
                f"cannot resume the data position: it was saved with {key}={state[key]} but this run has "
                f"{key}={run[key]}; resume with the same data and sharding, or start afresh"
            )


def collate(
    examples: Sequence[Mapping[str, Any]], pad_token_id: int, augmenting_pad_ids: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """Right-pads `input_ids` (and `labels`, with -100) to the longest example; int64 tensors [B, L].

    `labels` are optional (evaluation prompts may have none) but must be given for all examples or none.
    Augmenting tokens of models with a tokenizer of their own (tokenize_records with an aligner) are
    padded with augmenting_pad_ids[k] and come with their attention mask and visibility. Examples with
    `keep_anchor` (tokenize_records with keep_anchor_field) give `keep_anchor`, bool [B].
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
    if "keep_anchor" in examples[0]:
        batch["keep_anchor"] = torch.tensor([bool(e["keep_anchor"]) for e in examples])
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
            wanted = [c for c in self.dataset.column_names if c in ("input_ids", "labels", "keep_anchor") or c.startswith("augmenting")]
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
        check_data_position(state, {key: getattr(self, key) for key in _SHARDING})
        if not 0 <= state["next_batch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise DataError(f"cannot resume the data position epoch={state['epoch']}, next_batch="
                            f"{state['next_batch']}: an epoch has {self.batches_per_epoch} batches")
        self.epoch = state["epoch"]
        self.next_batch = state["next_batch"]
