"""Exact magnitude thresholds over a whole tensor, streamed: the k-th largest |x| of each series."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from merge.methods import fast_kernel

Tensor = torch.Tensor
Rank = int | Sequence[int] | Callable[[int], int]


class Difference(NamedTuple):
    """A block of x - base, counted without being made: the subtraction was a pass of its own. x and base
    as stored or in fp32; the difference is the fp32 one."""

    x: Tensor
    base: Tensor

    def value(self) -> Tensor:
        return self.x.float() - self.base.float()


Series = Callable[[], Iterable[list[Tensor | Difference]]]


def kth_largest_abs(series: Series, k: Rank) -> list[float]:
    """For each series of blocks, its k-th largest absolute value, exactly, in two streaming passes.
    A block is a tensor, or a Difference (task vectors: x - base).

    k: one rank for every series, one per series, or a function of the series' count of nonzero
    elements (SCE ranks among those). A rank of 0 or less gives inf: nothing reaches it. A block that
    appears twice in a pass's list (the same object: two ranks of one series, as Breadcrumbs asks) is
    counted once for both.

    A whole 70B embedding does not fit the memory budget, so no sort or torch.kthvalue over the tensor:
    for non-negative floats the int32 bit pattern orders like the value, so a 65536-bin histogram of the
    high 16 bits finds the bin holding the k-th largest, and a second histogram of the low 16 bits of
    the elements in that bin finds the value itself. Memory: two histograms per series. The counting is
    merge/methods/fast_pass.c's where it is built (torch's abs, shifts and bincount took 5 ns an element
    per pass, ~half of a TIES merge; the compiled count 0.8 ns), else torch's. The high count goes
    into 4 interleaved histograms per series, summed once at the end of the pass.
    """
    if isinstance(k, int) and k <= 0:  # nothing is kept: one block tells how many series there are
        return [math.inf] * len(next(iter(series())))
    lib = fast_kernel.library()
    first: list[int] = []  # each position's first occurrence in the lists (the same every pass)
    highs: list[Tensor] = []
    nonzero: list[int] = []
    for blocks in series():
        if not first:
            first = _first_of_each(blocks)
            ways = fast_kernel.HISTOGRAM_WAYS
            own = [torch.zeros(ways, 1 << 16, dtype=torch.int64) if f == i else None for i, f in enumerate(first)]
            highs, nonzero = [own[f] for f in first], [0] * len(blocks)
        for i, (hist, b) in enumerate(zip(highs, blocks, strict=True)):
            if first[i] == i:
                nonzero[i] += _count_high(lib, b, hist)
    nonzero = [nonzero[f] for f in first]
    summed = {id(hist): hist.sum(0) for hist in highs}
    highs = [summed[id(hist)] for hist in highs]
    if callable(k):
        ranks = [k(count) for count in nonzero]
    else:
        ranks = [k] * len(highs) if isinstance(k, int) else list(k)
    picks = [_pick(hist, rank) if rank > 0 else None for hist, rank in zip(highs, ranks, strict=True)]
    if all(pick is None for pick in picks):
        return [math.inf] * len(picks)
    # One low histogram per (first occurrence, high bin): a repeated block's ranks in one bin share it.
    shared: dict[tuple[int, int], Tensor] = {}
    for i, pick in enumerate(picks):
        if pick is not None and (first[i], pick[0]) not in shared:
            shared[first[i], pick[0]] = torch.zeros(1 << 16, dtype=torch.int64)
    lows = [shared[first[i], pick[0]] if pick is not None else None for i, pick in enumerate(picks)]
    for blocks in series():
        counting = set()
        for hist, b, pick in zip(lows, blocks, picks, strict=True):
            if pick is not None and id(hist) not in counting:
                counting.add(id(hist))
                _count_low(lib, b, pick[0], hist)
    values = []
    for hist, pick in zip(lows, picks, strict=True):
        if pick is None:
            values.append(math.inf)
            continue
        high, rank = pick
        low, _ = _pick(hist, rank)
        values.append(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item())
    return values


def _first_of_each(blocks: Sequence) -> list[int]:
    """For each position, where the same object first appears in blocks."""
    seen: dict[int, int] = {}
    return [seen.setdefault(id(b), i) for i, b in enumerate(blocks)]


def _count_high(lib, values: Tensor | Difference, ways: Tensor) -> int:
    """Adds the histogram of the high 16 bits of |values| to ways [HISTOGRAM_WAYS, 65536] (their sum is
    the histogram); returns the count of nonzero |values|."""
    tensors = _tensors(values)
    code = fast_kernel.stored_code(lib, tensors)
    if code is not None:
        return lib.magnitude_high_histogram(*_pointers(tensors), code, tensors[0].numel(), ways.data_ptr())
    bits = _value(values).abs().view(torch.int32)
    ways[0] += torch.bincount(bits.flatten() >> 16, minlength=1 << 16)
    return int(torch.count_nonzero(bits))


def _count_low(lib, values: Tensor | Difference, high: int, hist: Tensor) -> None:
    """Adds the histogram of the low 16 bits of the |values| whose high 16 bits are `high` to hist."""
    tensors = _tensors(values)
    code = fast_kernel.stored_code(lib, tensors)
    if code is not None:
        lib.magnitude_low_histogram(*_pointers(tensors), code, tensors[0].numel(), high, hist.data_ptr())
        return
    bits = _value(values).abs().view(torch.int32)
    hist += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)


def _tensors(values: Tensor | Difference) -> list[Tensor]:
    """What the compiled count reads: [values], or [x, base]."""
    return list(values) if isinstance(values, Difference) else [values]


def _value(values: Tensor | Difference) -> Tensor:
    """The fp32 values (blocks may come as stored: bfloat16, float16)."""
    return values.value() if isinstance(values, Difference) else values.float()


def _pointers(tensors: list[Tensor]) -> tuple[int, int | None]:
    """(values, base) for the C functions; base NULL for a plain tensor."""
    return tensors[0].data_ptr(), tensors[1].data_ptr() if len(tensors) > 1 else None


def _pick(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and that element's rank within the bin."""
    from_top = hist.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))
    if position >= len(hist):
        raise ValueError(f"rank {k} beyond the {int(from_top[-1])} counted elements")
    above = int(from_top[position]) - int(hist[len(hist) - 1 - position])
    return len(hist) - 1 - position, k - above
