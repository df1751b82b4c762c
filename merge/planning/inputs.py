"""Which input tensors make each output tensor, matched across every checkpoint.

Names, shapes, dtypes and vocabularies are checked across every checkpoint before anything is written.

Tied embeddings: a checkpoint that ties its output embedding stores only the input embedding. If every
input ties, the output ties too (and stores no output embedding); otherwise the output stores one,
made from each input's own output embedding or, for tying inputs, their input embedding.
Vocabularies: a tensor whose first dimension is each model's vocab_size may differ in that dimension
only under vocab_policy: truncate, which keeps the rows of the smallest vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from merge.io.checkpoint_folder import TIED_OUTPUT_EMBEDDINGS, Checkpoint
from merge.io.safetensors_file import FLOAT_CODES, TensorInfo
from merge.merge_errors import IncompatibleInputsError


@dataclass(frozen=True)
class TensorGroup:
    name: str
    shape: tuple[int, ...]  # the output's shape: rows beyond the smallest vocabulary are dropped
    sources: tuple[TensorInfo, ...]  # one per checkpoint, in config order

    @property
    def is_float(self) -> bool:
        return self.sources[0].dtype in FLOAT_CODES


@dataclass(frozen=True)
class InputLayout:
    groups: tuple[TensorGroup, ...]
    ties_embeddings: bool  # the output ties its embeddings (every input does)
    vocab_size: int | None  # the output's vocabulary when inputs' differed and were truncated


def match_tensors(checkpoints: Sequence[Checkpoint], vocab_policy: str) -> InputLayout:
    ties = all(c.ties_embeddings for c in checkpoints)
    names: dict[str, Checkpoint] = {}  # name -> first checkpoint holding it, in file order
    for ckpt in checkpoints:
        for name in ckpt.tensors:
            names.setdefault(name, ckpt)
    groups = []
    truncated: set[int] = set()
    for name, owner in names.items():
        if ties and name in TIED_OUTPUT_EMBEDDINGS:
            continue
        sources = []
        for ckpt in checkpoints:
            info = ckpt.tensors.get(name)
            if info is None:
                alias = ckpt.tied_source(name)
                if alias is None:
                    raise IncompatibleInputsError(
                        f"tensor '{name}' is in model '{owner.name}' but not in model '{ckpt.name}' ({ckpt.path})"
                    )
                info = ckpt.tensors[alias]
            sources.append(info)
        shape = _common_shape(name, checkpoints, sources, vocab_policy)
        if any(s.shape != shape for s in sources):
            truncated.add(shape[0])
        _check_dtypes(name, checkpoints, sources)
        groups.append(TensorGroup(name, shape, tuple(sources)))
    return InputLayout(tuple(groups), ties, min(truncated) if truncated else None)


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
            f"tensor '{name}': vocabulary sizes differ ({sizes}); set vocab_policy: truncate to merge "
            f"the first {min(vocabs)} rows (the tokens every model shares)"
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
