"""Merge methods: small pure functions over fp32 tensors, registered by name.

Their parameters and shape (base model, weights, passes over the inputs) are declared in
merge.methods.specs.

Linear and task arithmetic are exact: their result is the real-number formula rounded once
(`merge.methods.exact`), and they take any range of the inputs as stored (`any_range`). A method sees one block of every input at a time (`combine`), plus, when the formula needs a
whole-tensor statistic (TIES's magnitude thresholds, SLERP's angle), the result of `prepare`, which
streams the whole tensor's blocks once or twice beforehand (`MethodSpec.reads`). Everything elementwise is written as
separate IEEE operations (a product, then a sum), so a block gives bit for bit what the same formula
gives on the whole tensor. Blocks are fixed ranges of the flattened tensor (BLOCK elements), never
chunk-dependent: DARE's random masks are drawn per (seed, tensor, input, block), so results do not
depend on chunking or on how many workers run.

For methods with a base model, xs[0] is the base and weights[i] belongs to xs[i + 1].
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Any

import torch

from merge.methods import exact
from merge.methods.specs import (
    SPECS,
    LinearParams,
    MethodSpec,
    SlerpParams,
    SparseParams,
    TaskArithmeticParams,
)

Tensor = torch.Tensor
Blocks = Callable[[], Iterator[list[Tensor]]]


@dataclass(frozen=True)
class Block:
    """Which part of which tensor a combine call sees; seeded randomness derives from this alone."""

    tensor: str
    index: int
    size: int
    seed: int
    out_dtype: torch.dtype = torch.float32  # what the result is rounded to


@dataclass(frozen=True)
class Method:
    spec: MethodSpec
    combine: Callable[[Sequence[Tensor], Sequence[float], Any, Any, Block], Tensor]
    # The whole-tensor statistic, from `spec.reads - 1` passes over the blocks (None: no statistic).
    prepare: Callable[[Blocks, int, Any], Any] | None = None


def _weighted_sum(xs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    # In order, each term rounded to fp32 before it is added: this fixed sequence is "the exact result".
    return reduce(lambda acc, term: acc.add_(term), (x * w for x, w in zip(xs[1:], weights[1:], strict=True)), xs[0] * weights[0])


def linear(
    xs: Sequence[Tensor], weights: Sequence[float], params: LinearParams, stats: None, block: Block, out: Tensor | None = None
) -> Tensor:
    """sum_i w_i x_i / sum_i w_i (or without the division), exactly, rounded once to the output dtype.
    The raw weights, not w / sum(w): rounding the fractions first moves ties off centre."""
    coefficients = [Fraction(w) for w in weights]
    return exact.combine(xs, coefficients, sum(coefficients) if params.normalize else Fraction(1), block.out_dtype, out)


def task_arithmetic(
    xs: Sequence[Tensor], weights: Sequence[float], params: TaskArithmeticParams, stats: None, block: Block,
    out: Tensor | None = None,
) -> Tensor:
    """base + lambda * sum_i w_i (x_i - base), exactly, rounded once: the same value written as the
    linear combination (1 - lambda * sum w) * base + sum_i lambda * w_i * x_i."""
    scaled = [Fraction(params.scale) * Fraction(w) for w in weights]
    return exact.combine(xs, [1 - sum(scaled), *scaled], Fraction(1), block.out_dtype, out)


def disjoint_mean(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """TIES's sign election and disjoint merge: the weighted mean of the deltas agreeing with the sign
    of their weighted sum (zero where none agrees)."""
    weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
    sign = torch.sign(reduce(lambda acc, term: acc + term, weighted[1:], weighted[0]))
    numerator = torch.zeros_like(sign)
    denominator = torch.zeros_like(sign)
    for d, wd, w in zip(deltas, weighted, weights, strict=True):
        agree = (torch.sign(d) == sign) & (d != 0)
        numerator += torch.where(agree, wd, 0.0)
        denominator += torch.where(agree, w, 0.0)
    return torch.where(denominator != 0, numerator / denominator, 0.0)


def ties_thresholds(blocks: Blocks, numel: int, params: SparseParams) -> list[float]:
    """Per task vector, the k-th largest |x_i - base| over the whole tensor, k = round(density * numel)."""
    k = round(params.density * numel)
    deltas = lambda: ([x - xs[0] for x in xs[1:]] for xs in blocks())  # noqa: E731
    return kth_largest_abs(deltas, k)


def ties(xs: Sequence[Tensor], weights: Sequence[float], params: SparseParams, stats: list[float], block: Block) -> Tensor:
    base = xs[0]
    trimmed = [torch.where((x - base).abs() >= threshold, x - base, 0.0) for x, threshold in zip(xs[1:], stats, strict=True)]
    return base + disjoint_mean(trimmed, weights) * params.scale


def kth_largest_abs(series: Callable[[], Iterable[list[Tensor]]], k: int) -> list[float]:
    """For each series of blocks, its k-th largest absolute value, exactly, in two streaming passes.

    A whole 70B embedding does not fit the memory budget, so no sort or torch.kthvalue over the tensor:
    for non-negative floats the int32 bit pattern orders like the value, so a 65536-bin histogram of the
    high 16 bits finds the bin holding the k-th largest, and a second histogram of the low 16 bits of
    the elements in that bin finds the value itself. Memory: two histograms per series.
    """
    if k <= 0:  # nothing is kept: one block tells how many series there are
        return [math.inf] * len(next(iter(series())))
    highs: list[Tensor] = []
    for blocks in series():
        bits = [b.abs().view(torch.int32) for b in blocks]
        highs = highs or [torch.zeros(1 << 16, dtype=torch.int64) for _ in bits]
        for hist, b in zip(highs, bits, strict=True):
            hist += torch.bincount(b >> 16, minlength=1 << 16)
    picks = [_pick(hist, k) for hist in highs]
    lows = [torch.zeros(1 << 16, dtype=torch.int64) for _ in picks]
    for blocks in series():
        for hist, b, (high, _) in zip(lows, blocks, picks, strict=True):
            bits = b.abs().view(torch.int32)
            hist += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)
    values = []
    for hist, (high, rank) in zip(lows, picks, strict=True):
        low, _ = _pick(hist, rank)
        values.append(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item())
    return values


def _pick(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest element, and that element's rank within the bin."""
    from_top = hist.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))
    if position >= len(hist):
        raise ValueError(f"rank {k} beyond the {int(from_top[-1])} counted elements")
    above = int(from_top[position]) - int(hist[len(hist) - 1 - position])
    return len(hist) - 1 - position, k - above


def dare_keep(block: Block, model: int, density: float) -> Tensor:
    """DARE's Bernoulli(density) keep-mask for one input's block, from a generator seeded by
    (seed, tensor, input position, block index). Python's hash() is salted per process, so blake2b."""
    key = f"{block.seed}\0{block.tensor}\0{model}\0{block.index}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return torch.rand(block.size, generator=torch.Generator().manual_seed(seed)) < density


def _dare_deltas(xs: Sequence[Tensor], params: SparseParams, block: Block) -> list[Tensor]:
    base = xs[0]
    return [
        torch.where(dare_keep(block, i, params.density), (x - base) / params.density, 0.0)
        for i, x in enumerate(xs[1:], start=1)
    ]


def dare_linear(xs: Sequence[Tensor], weights: Sequence[float], params: SparseParams, stats: None, block: Block) -> Tensor:
    return xs[0] + _weighted_sum(_dare_deltas(xs, params, block), weights) * params.scale


def dare_ties(xs: Sequence[Tensor], weights: Sequence[float], params: SparseParams, stats: None, block: Block) -> Tensor:
    return xs[0] + disjoint_mean(_dare_deltas(xs, params, block), weights) * params.scale


def slerp_coefficients(blocks: Blocks, numel: int, params: SlerpParams) -> tuple[float, float]:
    """(c0, c1) with slerp = c0 * a + c1 * b, from the angle between the whole flattened tensors.

    The dot products are summed in fp64 per block and the block sums added with math.fsum, so the
    result does not depend on how the tensor was chunked.
    """
    dots: list[float] = []
    squares_a: list[float] = []
    squares_b: list[float] = []
    for a, b in blocks():
        a64, b64 = a.double(), b.double()
        dots.append(torch.dot(a64, b64).item())
        squares_a.append(torch.dot(a64, a64).item())
        squares_b.append(torch.dot(b64, b64).item())
    norm = math.sqrt(math.fsum(squares_a)) * math.sqrt(math.fsum(squares_b))
    cos = math.fsum(dots) / norm if norm > 0 else 1.0
    t = params.t
    if abs(cos) > params.dot_threshold:
        return 1.0 - t, t
    omega = math.acos(cos)
    return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def slerp(
    xs: Sequence[Tensor], weights: Sequence[float], params: SlerpParams, stats: tuple[float, float], block: Block
) -> Tensor:
    c0, c1 = stats
    return xs[0] * c0 + xs[1] * c1


METHODS: dict[str, Method] = {
    "linear": Method(SPECS["linear"], linear),
    "task_arithmetic": Method(SPECS["task_arithmetic"], task_arithmetic),
    "ties": Method(SPECS["ties"], ties, ties_thresholds),
    "dare_linear": Method(SPECS["dare_linear"], dare_linear),
    "dare_ties": Method(SPECS["dare_ties"], dare_ties),
    "slerp": Method(SPECS["slerp"], slerp, slerp_coefficients),
}
