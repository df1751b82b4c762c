"""Exact magnitude thresholds over a whole tensor, streamed: the k-th largest |x| of each series."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from merge.methods import fast_kernel

Tensor = torch.Tensor
Rank = int | Sequence[int] | Callable[[int], int]


def kth_largest_abs(series: Callable[[], Iterable[list[Tensor]]], k: Rank) -> list[float]:
    """For each series of blocks, its k-th largest absolute value, exactly, in two streaming passes.

    k: one rank for every series, one per series, or a function of the series' count of nonzero
    elements (SCE ranks among those). A rank of 0 or less gives inf: nothing reaches it.

    A whole 70B embedding does not fit the memory budget, so no sort or torch.kthvalue over the tensor:
    for non-negative floats the int32 bit pattern orders like the value, so a 65536-bin histogram of the
    high 16 bits finds the bin holding the k-th largest, and a second histogram of the low 16 bits of
    the elements in that bin finds the value itself. Memory: two histograms per series. The counting is
    merge/methods/fast_pass.c's where it is built (torch's abs, shifts and bincount took 5 ns an element
    per pass, ~half of a TIES merge; the compiled count 0.8 ns), else torch's.
    """
    if isinstance(k, int) and k <= 0:  # nothing is kept: one block tells how many series there are
        return [math.inf] * len(next(iter(series())))
    lib = fast_kernel.library()
    highs: list[Tensor] = []
    nonzero: list[int] = []
    for blocks in series():
        highs = highs or [torch.zeros(1 << 16, dtype=torch.int64) for _ in blocks]
        nonzero = nonzero or [0] * len(blocks)
        for i, (hist, b) in enumerate(zip(highs, blocks, strict=True)):
            nonzero[i] += _count_high(lib, b, hist)
    if callable(k):
        ranks = [k(count) for count in nonzero]
    else:
        ranks = [k] * len(highs) if isinstance(k, int) else list(k)
    picks = [_pick(hist, rank) if rank > 0 else None for hist, rank in zip(highs, ranks, strict=True)]
    if all(pick is None for pick in picks):
        return [math.inf] * len(picks)
    lows = [torch.zeros(1 << 16, dtype=torch.int64) for _ in picks]
    for blocks in series():
        for hist, b, pick in zip(lows, blocks, picks, strict=True):
            if pick is not None:
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


def _count_high(lib, values: Tensor, hist: Tensor) -> int:
    """Adds the histogram of the high 16 bits of |values| to hist; returns the count of nonzero |values|."""
    if fast_kernel.magnitude_histograms(lib, values):
        return lib.magnitude_high_histogram(values.data_ptr(), values.numel(), hist.data_ptr())
    bits = values.abs().view(torch.int32)
    hist += torch.bincount(bits.flatten() >> 16, minlength=1 << 16)
    return int(torch.count_nonzero(bits))


def _count_low(lib, values: Tensor, high: int, hist: Tensor) -> None:
    """Adds the histogram of the low 16 bits of the |values| whose high 16 bits are `high` to hist."""
    if fast_kernel.magnitude_histograms(lib, values):
        lib.magnitude_low_histogram(values.data_ptr(), values.numel(), high, hist.data_ptr())
        return
    bits = values.abs().view(torch.int32)
    hist += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)


def _pick(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and that element's rank within the bin."""
    from_top = hist.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))
    if position >= len(hist):
        raise ValueError(f"rank {k} beyond the {int(from_top[-1])} counted elements")
    above = int(from_top[position]) - int(hist[len(hist) - 1 - position])
    return len(hist) - 1 - position, k - above
