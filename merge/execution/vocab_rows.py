"""A vocabulary tensor whose rows are remapped by token (merge.planning.vocab), merged whole in memory.

Its inputs have different rows (and row counts), so it cannot be streamed as ranges common to every
input: each input is read whole, its rows gathered into the output's order, and the method run over
those, block by block as on the stream (merge.execution.stream), so a method's statistics and seeded
masks are defined the same way. `calm plan` counts the memory (merge.planning.vocab.remap_bytes).

- tokens_default set (tokenizer source base or a model): a model lacking a token contributes zeros,
  the mean of the rows of the models that have it, or the fill model's row; then one merge over all.
- union: rows are grouped by which models have their token. A group every model shares is merged as
  one tensor under the tensor's own name; a group of some models by the method over just those (named
  `NAME[i+j]`, for seeded masks; a base lacking the tokens is stood in for by the mean of their rows,
  mergekit's fill); a token one model has is that model's row, rounded to the output dtype.
Rows without a token (padding) are the source model's own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from merge.io.safetensors_file import TensorInfo
from merge.merge_errors import CheckpointError
from merge.methods.registry import METHODS, Block, Method
from merge.methods.specs import block_elements
from merge.planning.plan import OutputTensor

_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_whole(info: TensorInfo) -> torch.Tensor:
    """An input tensor as fp32 rows [rows, rest]."""
    with open(info.path, "rb") as f:
        data = os.pread(f.fileno(), info.nbytes, info.offset)
    if len(data) < info.nbytes:
        raise CheckpointError(f"{info.path}: truncated while merging: tensor '{info.name}' ends past its end")
    values = torch.frombuffer(bytearray(data), dtype=_TORCH[info.dtype]) if data else torch.empty(0, dtype=_TORCH[info.dtype])
    return values.float().reshape(info.shape[0], -1)


def merge_rows(tensor: OutputTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The output tensor, whole, flattened, in out_dtype."""
    rows = tensor.rows
    assert rows is not None
    method = METHODS[tensor.method]
    params = method.spec.params.model_validate(tensor.params)
    xs = [read_whole(s) for s in tensor.sources]
    maps = torch.tensor(rows.maps, dtype=torch.int64).reshape(len(xs), rows.rows)
    present = maps >= 0
    width = xs[0].shape[1]
    out = torch.empty((rows.rows, width), dtype=out_dtype)
    if rows.fill is None:
        _union(tensor, method, params, xs, maps, present, out)
    else:
        full = _filled(rows.fill, rows.fill_from, xs, maps, present)
        out.copy_(_run(method, params, [x.reshape(-1) for x in full], tensor.weights, tensor.name, tensor.seed,
                       out_dtype, tensor.shape[1:]).reshape(rows.rows, width))
    padding = torch.tensor(rows.padding, dtype=torch.int64)
    if len(padding):
        out[padding] = xs[rows.padding_from][maps[rows.padding_from][padding]].to(out_dtype)
    return out.reshape(-1)


def _gather(x: torch.Tensor, map_: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The input's rows in the output's order, zeros where it lacks the token."""
    rows = torch.zeros((len(map_), x.shape[1]), dtype=torch.float32)
    rows[present] = x[map_[present]]
    return rows


def _mean_rows(xs: Sequence[torch.Tensor], maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per output row, the mean of the rows of the inputs that have its token (summed in input order,
    then divided once, as mergekit averages)."""
    total = torch.zeros((maps.shape[1], xs[0].shape[1]), dtype=torch.float32)
    for x, map_, have in zip(xs, maps, present, strict=True):
        total[have] = total[have] + x[map_[have]]
    count = present.sum(0).clamp(min=1).to(torch.float32)
    return total / count[:, None]


def _filled(fill: str, fill_from: int, xs: Sequence[torch.Tensor], maps: torch.Tensor, present: torch.Tensor) -> list[torch.Tensor]:
    if fill == "mean":
        default = _mean_rows(xs, maps, present)
    elif fill == "base":
        default = _gather(xs[fill_from], maps[fill_from], present[fill_from])
    else:
        default = torch.zeros((maps.shape[1], xs[0].shape[1]), dtype=torch.float32)
    full = []
    for x, map_, have in zip(xs, maps, present, strict=True):
        rows = default.clone()
        rows[have] = x[map_[have]]
        full.append(rows)
    return full


def _union(tensor: OutputTensor, method: Method, params: Any, xs: Sequence[torch.Tensor], maps: torch.Tensor,
           present: torch.Tensor, out: torch.Tensor) -> None:
    count = len(xs)
    has_base = tensor.rows is not None and tensor.rows.has_base
    keys = sum(present[k].to(torch.int64) << k for k in range(count))
    for key in torch.unique(keys).tolist():
        where = (keys == key).nonzero().flatten()
        members = [k for k in range(count) if key >> k & 1]
        assert members, "every output row has a source (merge.planning.vocab.plan_vocabulary)"
        parts = [xs[k][maps[k][where]] for k in members]
        if len(members) == 1:
            out[where] = parts[0].to(out.dtype)
            continue
        weights = list(tensor.weights)
        if has_base:
            weights = [weights[k - 1] for k in members if k != 0] if weights else []
            if members[0] != 0:
                parts.insert(0, sum(parts[1:], parts[0]) / len(parts))
        elif weights:
            weights = [weights[k] for k in members]
        name = tensor.name if len(members) == count else f"{tensor.name}[{'+'.join(map(str, members))}]"
        merged = _run(method, params, [p.reshape(-1) for p in parts], weights, name, tensor.seed, out.dtype,
                      tensor.shape[1:])
        out[where] = merged.reshape(len(where), -1)


def _run(method: Method, params: Any, xs: Sequence[torch.Tensor], weights: Sequence[float], name: str, seed: int,
         out_dtype: torch.dtype, row_shape: tuple[int, ...]) -> torch.Tensor:
    """The method over whole flattened fp32 inputs, each a stack of rows of `row_shape` (the tensor's
    shape past the vocabulary dimension), block by block as merge.execution.stream runs it."""
    numel = len(xs[0])
    shape = (numel // max(1, math.prod(row_shape)), *row_shape)
    step = block_elements(method.spec, shape)

    def blocks() -> Iterator[tuple[Block, list[torch.Tensor]]]:
        for begin in range(0, numel, step):
            end = min(begin + step, numel)
            yield Block(name, begin // step, end - begin, seed, out_dtype, shape), [x[begin:end] for x in xs]

    stats = method.prepare(blocks, numel, params, weights) if method.prepare is not None and numel else None
    result = torch.empty(numel, dtype=out_dtype)
    for block, parts in blocks():
        piece = result[block.index * step : block.index * step + block.size]
        if method.spec.any_range:
            method.combine(parts, weights, params, stats, block, out=piece)
        else:
            piece.copy_(method.combine(parts, weights, params, stats, block))
    return result
