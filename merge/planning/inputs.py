"""Which input tensors make each output tensor, matched across every checkpoint; and which make none.

Names, shapes, dtypes and vocabularies are checked across every checkpoint before anything is written.

Every input tensor is accounted for: merged, copied (integer tensors), or left out by a rule, each
recorded (InputLayout.dropped) for merge_report.json and `calm merge --verify`. The rules: a `drop:`
pattern of the config, and tied embeddings (below). A tensor that some inputs lack is an error unless
a `drop:` pattern leaves it out: merging it from the others, or leaving it out silently, would each
surprise someone.

Tied embeddings: a checkpoint that ties its output embedding stores only the input embedding. If every
input ties, the output ties too (and stores no output embedding); otherwise the output stores one,
made from each input's own output embedding or, for tying inputs, their input embedding.
Vocabularies: a tensor whose first dimension is each model's vocab_size may differ in that dimension
only under vocab_policy: truncate, which keeps the rows of the smallest vocabulary, or with a
`tokenizer:` setting, which remaps its rows (merge.planning.vocab).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from merge.io.checkpoint_folder import TIED_OUTPUT_EMBEDDINGS, Checkpoint
from merge.io.safetensors_file import FLOAT_CODES, TensorInfo
from merge.merge_errors import ConfigError, IncompatibleInputsError
from merge.planning.vocab import VocabRows

TIED_RULE = "tied embeddings: every input ties it to its input embedding, and so does the output"
# Tensors some inputs lack, named in full in the error; the rest are counted.
LISTED = 8


@dataclass(frozen=True)
class TensorGroup:
    name: str
    shape: tuple[int, ...]  # the output's shape: rows beyond the smallest vocabulary are dropped
    sources: tuple[TensorInfo, ...]  # one per checkpoint, in config order
    rows: VocabRows | None = None  # a vocabulary tensor remapped row by row (config order)

    @property
    def is_float(self) -> bool:
        return self.sources[0].dtype in FLOAT_CODES


@dataclass(frozen=True)
class Dropped:
    """Input tensors left out of the output, and the config's rule that leaves them out."""

    tensor: str
    models: tuple[str, ...]  # the inputs that hold it
    rule: str


@dataclass(frozen=True)
class InputLayout:
    groups: tuple[TensorGroup, ...]
    ties_embeddings: bool  # the output ties its embeddings (every input does)
    vocab_size: int | None  # the output's vocabulary when inputs' differed and were truncated
    dropped: tuple[Dropped, ...] = ()


def match_tensors(
    checkpoints: Sequence[Checkpoint], vocab_policy: str, drop: Sequence[str] = (), vocab: VocabRows | None = None,
) -> InputLayout:
    """Group every input tensor by name. `drop`: the config's drop patterns; `vocab`: the rows of the
    output vocabulary when a tokenizer setting remaps them (merge.planning.vocab.plan_vocabulary)."""
    ties = all(c.ties_embeddings for c in checkpoints)
    names: dict[str, list[Checkpoint]] = {}  # name -> the checkpoints holding it, first seen first
    for ckpt in checkpoints:
        for name in ckpt.tensors:
            names.setdefault(name, []).append(ckpt)
    groups, dropped, partial = [], [], []
    used = [False] * len(drop)
    truncated: set[int] = set()
    for name, holders in names.items():
        hit = next((i for i, pattern in enumerate(drop) if fnmatch.fnmatchcase(name, pattern)), None)
        if hit is not None:
            used[hit] = True
            dropped.append(Dropped(name, tuple(c.name for c in holders), f"drop[{hit}]: {drop[hit]!r}"))
            continue
        if ties and name in TIED_OUTPUT_EMBEDDINGS:
            dropped.append(Dropped(name, tuple(c.name for c in holders), TIED_RULE))
            continue
        sources = []
        for ckpt in checkpoints:
            info = ckpt.tensors.get(name)
            if info is None:
                alias = ckpt.tied_source(name)
                if alias is None:
                    partial.append((name, holders))
                    break
                info = ckpt.tensors[alias]
            sources.append(info)
        if len(sources) < len(checkpoints):
            continue
        rows = vocab if vocab is not None and _is_vocab(checkpoints, sources) else None
        shape = (rows.rows, *sources[0].shape[1:]) if rows else _common_shape(name, checkpoints, sources, vocab_policy)
        if rows is None and any(s.shape != shape for s in sources):
            truncated.add(shape[0])
        _check_dtypes(name, checkpoints, sources)
        groups.append(TensorGroup(name, shape, tuple(sources), rows))
    if partial:
        raise IncompatibleInputsError(_partial_message(checkpoints, partial))
    for i, hit in enumerate(used):
        if not hit:
            raise ConfigError(f"drop[{i}]: {drop[i]!r} matches no tensor of any input")
    return InputLayout(tuple(groups), ties, min(truncated) if truncated else None, tuple(dropped))


def _is_vocab(checkpoints: Sequence[Checkpoint], sources: Sequence[TensorInfo]) -> bool:
    """A tensor indexed by token: its first dimension is each model's vocab_size, the rest agree."""
    return all(
        s.shape and s.shape[0] == c.vocab_size and s.shape[1:] == sources[0].shape[1:]
        for c, s in zip(checkpoints, sources, strict=True)
    )


def _partial_message(checkpoints: Sequence[Checkpoint], partial: list[tuple[str, list[Checkpoint]]]) -> str:
    def one(name: str, holders: list[Checkpoint]) -> str:
        lacking = [c.name for c in checkpoints if c not in holders]
        nor = "".join(f" nor '{n}'" for n in lacking[1:])
        return f"tensor '{name}' is in model '{holders[0].name}' but not in model '{lacking[0]}'{nor}"

    listed = "; ".join(one(name, holders) for name, holders in partial[:LISTED])
    more = f"; and {len(partial) - LISTED} more such tensors" if len(partial) > LISTED else ""
    return (f"{listed}{more}. A merge leaves an input tensor out only by a rule: add patterns matching "
            f"{'it' if len(partial) == 1 else 'them'} to drop: to leave {'it' if len(partial) == 1 else 'them'} "
            "out of the output")


def _common_shape(name: str, checkpoints: Sequence[Checkpoint], sources: Sequence[TensorInfo], policy: str) -> tuple[int, ...]:
    shapes = [s.shape for s in sources]
    if all(shape == shapes[0] for shape in shapes):
        return shapes[0]
    vocabs = [c.vocab_size for c in checkpoints]
    is_vocab = all(
        shape and shape[1:] == shapes[0][1:] and shape[0] == vocab for shape, vocab in zip(shapes, vocabs, strict=True)
    )
    if not is_vocab:
        i = next(i for i, shape in enumerate(shapes) if shape != shapes[0])
        raise IncompatibleInputsError(
            f"tensor '{name}' has shape {list(shapes[0])} in model '{checkpoints[0].name}' "
            f"but {list(shapes[i])} in model '{checkpoints[i].name}'"
        )
    sizes = ", ".join(f"{c.name}: {v}" for c, v in zip(checkpoints, vocabs, strict=True))
    if policy != "truncate":
        raise IncompatibleInputsError(
            f"tensor '{name}': vocabulary sizes differ ({sizes}); set tokenizer: {{source: union}} (or "
            f"{{source: base, tokens_default: zero|mean|base}}) to remap its rows by token, or vocab_policy: "
            f"truncate to merge the first {min(vocabs)} rows (the tokens every model shares)"
        )
    return (min(vocabs), *shapes[0][1:])


def _check_dtypes(name: str, checkpoints: Sequence[Checkpoint], sources: Sequence[TensorInfo]) -> None:
    first = sources[0]
    for ckpt, info in zip(checkpoints, sources, strict=True):
        if (info.dtype in FLOAT_CODES) != (first.dtype in FLOAT_CODES):
            raise IncompatibleInputsError(
                f"tensor '{name}' is {first.dtype} in model '{checkpoints[0].name}' but {info.dtype} in model "
                f"'{ckpt.name}': floating-point and integer tensors cannot be merged"
            )
        if first.dtype not in FLOAT_CODES and info.dtype != first.dtype:
            raise IncompatibleInputsError(
                f"integer tensor '{name}' is {first.dtype} in model '{checkpoints[0].name}' but {info.dtype} "
                f"in model '{ckpt.name}'; integer tensors are copied, so their dtypes must agree"
            )
