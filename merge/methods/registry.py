"""Merge methods: small pure functions over fp32 tensors, registered by name.

Their parameters and shape (base model, weights, passes over the inputs) are declared in
merge.methods.specs; the families with more than a formula each live in a module of their own:
sparse task vectors (merge.methods.sparse: DARE, Breadcrumbs, SCE; merge.methods.della) and merges on the sphere
(merge.methods.spherical: Model Stock, Multi-SLERP, NuSLERP, Karcher). Those follow mergekit 0.1.5's
definitions and its fp32 arithmetic (tests/fixtures/mergekit/).

Linear and task arithmetic are exact: their result is the real-number formula rounded once
(`merge.methods.exact`), and they take any range of the inputs as stored (`any_range`). A method sees
one block of every input at a time (`combine`), plus, when the formula needs a whole-tensor statistic
(magnitude thresholds, norms, angles), the result of `prepare`, which streams the whole tensor's blocks
once or more beforehand (`MethodSpec.reads`). Everything elementwise is written as separate IEEE
operations (a product, then a sum), so a block gives bit for bit what the same formula gives on the
whole tensor. Blocks are fixed ranges of the flattened tensor (merge.methods.blocks), never
chunk-dependent: random masks are drawn per (seed, tensor, input, block), so results do not depend on
chunking or on how many workers run.

For methods with a base model, xs[0] is the base and weights[i] belongs to xs[i + 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from functools import reduce

import torch

from merge.methods import della, exact, fast_kernel, sparse, spherical
from merge.methods.blocks import Block, Blocks, Method, Tensor
from merge.methods.magnitude import Difference, kth_largest_abs
from merge.methods.sparse import dare_keep
from merge.methods.specs import (
    SPECS,
    LinearParams,
    PassthroughParams,
    SlerpParams,
    SparseParams,
    TaskArithmeticParams,
)

__all__ = ["METHODS", "Block", "Method", "dare_keep", "kth_largest_abs"]


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


def ties_thresholds(blocks: Blocks, numel: int, params: SparseParams, weights: Sequence[float]) -> list[float]:
    """Per task vector, the k-th largest |x_i - base| over the whole tensor, k = round(density * numel)."""
    k = round(params.density * numel)
    deltas = lambda: ([Difference(x, xs[0]) for x in xs[1:]] for _, xs in blocks())  # noqa: E731
    return kth_largest_abs(deltas, k)


def ties(xs: Sequence[Tensor], weights: Sequence[float], params: SparseParams, stats: list[float], block: Block) -> Tensor:
    compiled = fast_kernel.ties_merge(xs, stats, weights, params.scale)  # the same ops in one pass
    if compiled is not None:
        return compiled
    base = xs[0]
    trimmed = [torch.where((x - base).abs() >= threshold, x - base, 0.0) for x, threshold in zip(xs[1:], stats, strict=True)]
    return base + disjoint_mean(trimmed, weights) * params.scale


def slerp_coefficients(blocks: Blocks, numel: int, params: SlerpParams, weights: Sequence[float]) -> tuple[float, float]:
    """(c0, c1) with slerp = c0 * a + c1 * b, from the angle between the whole flattened tensors.

    The dot products are summed in fp64 per block and the block sums added with math.fsum (the Gram
    matrix of merge.methods.spherical), so the result does not depend on how the tensor was chunked.
    """
    (squares_a, dot), (_, squares_b) = spherical.gram(blocks, base=False)
    norm = math.sqrt(squares_a) * math.sqrt(squares_b)
    cos = dot / norm if norm > 0 else 1.0
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


def passthrough(
    xs: Sequence[Tensor], weights: Sequence[float], params: PassthroughParams, stats: None, block: Block,
    out: Tensor | None = None,
) -> Tensor:
    """The one input, as stored: a layer slice's copy (merge.planning.slices), converted only when the
    output's dtype differs."""
    if out is None:
        return xs[0].to(block.out_dtype)
    return out.copy_(xs[0])


METHODS: dict[str, Method] = {
    "linear": Method(SPECS["linear"], linear),
    "task_arithmetic": Method(SPECS["task_arithmetic"], task_arithmetic),
    "ties": Method(SPECS["ties"], ties, ties_thresholds),
    "dare_linear": Method(SPECS["dare_linear"], sparse.dare_linear, sparse.dare_statistic),
    "dare_ties": Method(SPECS["dare_ties"], sparse.dare_ties, sparse.dare_statistic),
    "della": Method(SPECS["della"], della.della, della.della_statistic),
    "della_linear": Method(SPECS["della_linear"], della.della_linear, della.della_statistic),
    "breadcrumbs": Method(SPECS["breadcrumbs"], sparse.breadcrumbs, sparse.breadcrumbs_statistic),
    "breadcrumbs_ties": Method(SPECS["breadcrumbs_ties"], sparse.breadcrumbs_ties, sparse.breadcrumbs_statistic),
    "sce": Method(SPECS["sce"], sparse.sce, sparse.sce_statistic),
    "model_stock": Method(SPECS["model_stock"], spherical.model_stock, spherical.model_stock_ratio),
    "multislerp": Method(SPECS["multislerp"], spherical.multislerp, spherical.multislerp_statistic),
    "nuslerp": Method(SPECS["nuslerp"], spherical.nuslerp, spherical.nuslerp_statistic),
    "karcher": Method(SPECS["karcher"], spherical.karcher, spherical.karcher_statistic),
    "slerp": Method(SPECS["slerp"], slerp, slerp_coefficients),
    "passthrough": Method(SPECS["passthrough"], passthrough),
}
