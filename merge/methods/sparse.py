"""Sparse task-vector merges as mergekit 0.1.5 defines them: DARE, Model Breadcrumbs, SCE.

Each task vector (x_i - base) is masked (at random for DARE, by magnitude for Breadcrumbs, by the
variance across models for SCE), optionally rescaled to its L1 norm, then mixed: weighted, summed,
with TIES's sign election for the `_ties` variants. The elementwise steps are mergekit's own fp32 ops
in its order (`torch.stack(...).sum(0)` included), so a block gives what mergekit gives on the whole
tensor; its whole-tensor statistics (thresholds, L1 norms, mean squares) come from `prepare` passes,
summed in fp64 and rounded to fp32 where mergekit has an fp32 reduction.

Random masks are drawn per (seed, tensor, input, block) (merge.methods.blocks.block_uniform), not from
torch's global generator as mergekit draws them: reproducible whatever the chunking, workers or
resumes, and not mergekit's stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from merge.methods import fast_kernel
from merge.methods.blocks import Block, Blocks, Tensor, as_floats, block_key, block_uniform
from merge.methods.magnitude import Difference, kth_largest_abs
from merge.methods.per_model import each_model
from merge.methods.specs import BreadcrumbsParams, DareParams, DellaParams, SceParams

# mergekit's RescaleNorm.l1 leaves a task vector unscaled when either norm is below this.
RESCALE_EPS = 1e-7


class Sparsity(NamedTuple):
    """Per task vector: the magnitude window kept (Breadcrumbs) and the factor restoring its L1 norm."""

    lower: list[float]  # keep |d| >= lower
    upper: list[float]  # and |d| < upper
    rescale: list[Tensor | None]  # 0-d fp32, or None: left as masked


def dare_keep(block: Block, model: int, density: float) -> Tensor:
    """DARE's Bernoulli(density) keep-mask for one input's block."""
    return block_uniform(block, model) < density


def sign_consensus(tvs: Tensor) -> Tensor:
    """TIES's election as mergekit does it: a stacked task vector agrees where its sign is that of
    the sum over models, a zero sum counting as positive (a zero element never agrees)."""
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    return tvs.sign() == majority


def mix(base: Tensor, tvs: Sequence[Tensor], weights: Sequence[float], ties: bool, normalize: bool, scale: float) -> Tensor:
    """mergekit's generalized task arithmetic after sparsification: base + lambda * the weighted task
    vectors' sum (over those agreeing in sign, for TIES), divided by the weights' sum if normalize."""
    w = _weights(weights)
    divisor = _divisor(w)
    compiled = fast_kernel.mix_merge(base, tvs, weights, ties, normalize, divisor, scale)
    if compiled is not None:  # the same ops in one pass
        return compiled
    weighted = torch.stack(list(tvs)) * w
    if ties:
        agree = sign_consensus(weighted)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
    if normalize:
        mixed /= divisor
    if scale != 1:
        mixed *= scale
    return base + mixed


def _weights(weights: Sequence[float]) -> Tensor:
    """The weights as mergekit holds them: fp32, one row per model."""
    return torch.tensor(list(weights), dtype=torch.float32).unsqueeze(-1)


def _divisor(w: Tensor) -> float:
    """mix's divisor without TIES: the weights' fp32 sum, or 1 where it is about 0."""
    total = w.sum(dim=0)
    return 1.0 if total.abs() < 1e-8 else total.item()


Masking = Callable[[Block, int, Tensor], Tensor]  # (block, input position, task vector) -> masked
# (block, input position, x, base as stored) -> the L1 norms of x - base and of it masked, or None: not compiled here.
CompiledNorms = Callable[[Block, int, Tensor, Tensor], "tuple[float, float] | None"]


def l1_ratios(blocks: Blocks, masked: Masking, count: int, compiled: CompiledNorms | None = None) -> list[Tensor | None]:
    """For each task vector, |d|_1 / |masked d|_1 as mergekit's fp32 0-d division, or None where
    either norm is under RESCALE_EPS. The sums are fp64 over blocks, each rounded once to fp32."""
    before: list[list[float]] = [[] for _ in range(count)]
    after: list[list[float]] = [[] for _ in range(count)]
    for block, stored in blocks():
        def norms_of(model: int, block: Block = block, xs: Sequence[Tensor] = stored) -> tuple[float, float]:
            norms = compiled(block, model, xs[model], xs[0]) if compiled is not None else None
            if norms is None:
                delta = xs[model].float() - xs[0].float()
                norms = delta.abs().double().sum().item(), masked(block, model, delta).abs().double().sum().item()
            return norms

        for i, norms in enumerate(each_model(norms_of, range(1, len(stored)))):
            before[i].append(norms[0])
            after[i].append(norms[1])
    ratios: list[Tensor | None] = []
    for b, a in zip(before, after, strict=True):
        b32, a32 = torch.tensor(math.fsum(b), dtype=torch.float32), torch.tensor(math.fsum(a), dtype=torch.float32)
        ratios.append(None if b32 < RESCALE_EPS or a32 < RESCALE_EPS else b32 / a32)
    return ratios


def rescaled(masked: Tensor, ratio: Tensor | None) -> Tensor:
    return masked if ratio is None else masked * ratio


# DARE


def _dare_masked(params: DareParams) -> Masking:
    def masked(block: Block, model: int, delta: Tensor) -> Tensor:
        return delta * dare_keep(block, model, params.density).to(delta.dtype)

    return masked


def random_mask_ratios(blocks: Blocks, masked: Masking, params: DareParams | DellaParams, count: int,
                       compiled: CompiledNorms | None = None) -> list[Tensor | None] | None:
    """A randomly masked method's statistic (DARE, DELLA): each task vector's L1 rescale factor, or
    None where density 1 keeps everything or rescaling is off."""
    if params.density >= 1 or not params.rescale:
        return None
    return l1_ratios(blocks, masked, count, compiled)


# (block, input position, x, base as stored) -> the compiled pass's mask of that task vector, or None: not compiled here.
CompiledMask = Callable[[Block, int, Tensor, Tensor], "fast_kernel.Mask | None"]


def masked_mix(xs: Sequence[Tensor], weights: Sequence[float], normalize: bool, scale: float, masked: Masking,
               ratios: Sequence[Tensor | None], block: Block, ties: bool, compiled: CompiledMask | None = None) -> Tensor:
    """Each task vector masked and rescaled by its ratio (None: not rescaled), then mixed. xs as stored
    (MethodSpec.stored_blocks): the compiled pass reads them so; the torch code widens them."""
    masks = [compiled(block, i, x, xs[0]) for i, x in enumerate(xs[1:], start=1)] if compiled is not None else []
    if masks and None not in masks:
        divisor = _divisor(_weights(weights))
        merged = fast_kernel.sparse_merge(xs, masks, ratios, weights, ties, normalize, divisor, scale)
        if merged is not None:
            return merged
    base, *models = as_floats(xs)
    tvs = [rescaled(masked(block, i, x - base), r) for i, (x, r) in enumerate(zip(models, ratios, strict=True), start=1)]
    return mix(base, tvs, weights, ties, normalize, scale)


def random_mask_mix(xs: Sequence[Tensor], weights: Sequence[float], params: DareParams | DellaParams, masked: Masking,
                    ratios: list | None, block: Block, ties: bool, compiled: CompiledMask | None = None) -> Tensor:
    """Each task vector masked (below density 1) and rescaled by its ratio, then mixed."""
    if params.density >= 1:
        return unmasked_mix(xs, weights, ties, params.normalize, params.scale)
    ratios = ratios or [None] * (len(xs) - 1)
    return masked_mix(xs, weights, params.normalize, params.scale, masked, ratios, block, ties, compiled)


def unmasked_mix(xs: Sequence[Tensor], weights: Sequence[float], ties: bool, normalize: bool, scale: float) -> Tensor:
    """Every task vector whole (density 1, no window), mixed; xs as stored or fp32."""
    base, *models = as_floats(xs)
    return mix(base, [x - base for x in models], weights, ties, normalize, scale)


def dare_statistic(blocks: Blocks, numel: int, params: DareParams, weights: Sequence[float]) -> list[Tensor | None] | None:
    """The L1 rescale factors. Unlike DELLA's, DARE's masks are drawn again by the merge pass: held from this
    pass, packed, they cost it what they saved the merge (perf at 499 Hz of a 3 x 1.1B dare_linear merge,
    2026-12-07: masked_l1 +199 samples, sparse_merge -207, of 7,161 and 7,441; the same wall time, interleaved)."""
    def compiled(block: Block, model: int, x: Tensor, base: Tensor) -> tuple[float, float] | None:
        return fast_kernel.masked_l1(x, base, fast_kernel.Mask.dare(block_key(block, model), params.density))

    return random_mask_ratios(blocks, _dare_masked(params), params, len(weights), compiled)


def _dare(xs: Sequence[Tensor], weights: Sequence[float], params: DareParams, ratios: list | None, block: Block,
          ties: bool) -> Tensor:
    def compiled(block: Block, model: int, x: Tensor, base: Tensor) -> fast_kernel.Mask:
        return fast_kernel.Mask.dare(block_key(block, model), params.density)

    return random_mask_mix(xs, weights, params, _dare_masked(params), ratios, block, ties, compiled)


def dare_linear(xs: Sequence[Tensor], weights: Sequence[float], params: DareParams, ratios: list | None, block: Block) -> Tensor:
    return _dare(xs, weights, params, ratios, block, ties=False)


def dare_ties(xs: Sequence[Tensor], weights: Sequence[float], params: DareParams, ratios: list | None, block: Block) -> Tensor:
    return _dare(xs, weights, params, ratios, block, ties=True)


# Model Breadcrumbs


def breadcrumbs_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(e, kept): mergekit keeps, of each task vector sorted by magnitude, the `kept` elements below
    the `e` largest, e = the gamma outliers, fewer where density leaves too few below them."""
    kept = int(density * numel)
    top = int(gamma * numel)
    bottom = max(0, numel - kept - top)
    return numel - bottom - kept, kept


def breadcrumbs_statistic(blocks: Blocks, numel: int, params: BreadcrumbsParams, weights: Sequence[float]) -> Sparsity | None:
    if params.density >= 1:
        return None
    count = len(weights)
    outliers, kept = breadcrumbs_window(numel, params.density, params.gamma)
    deltas = lambda: ([Difference(x, xs[0]) for x in xs[1:]] * 2 for _, xs in blocks())  # noqa: E731
    thresholds = kth_largest_abs(deltas, [outliers] * count + [outliers + kept] * count if kept else [0] * 2 * count)
    upper, lower = thresholds[:count], thresholds[count:]
    ratios: list[Tensor | None] = [None] * count
    if params.rescale:
        def masked(block: Block, model: int, delta: Tensor) -> Tensor:
            return _window(delta, lower[model - 1], upper[model - 1])

        def compiled(block: Block, model: int, x: Tensor, base: Tensor) -> tuple[float, float] | None:
            return fast_kernel.masked_l1(x, base, fast_kernel.Mask.window(lower[model - 1], upper[model - 1]))

        ratios = l1_ratios(blocks, masked, count, compiled)
    return Sparsity(lower, upper, ratios)


def _window(delta: Tensor, lower: float, upper: float) -> Tensor:
    magnitude = delta.abs()
    return delta * ((magnitude >= lower) & (magnitude < upper)).to(delta.dtype)


def _breadcrumbs(xs: Sequence[Tensor], weights: Sequence[float], params: BreadcrumbsParams, stats: Sparsity | None,
                 block: Block, ties: bool) -> Tensor:
    if stats is None:
        return unmasked_mix(xs, weights, ties, params.normalize, params.scale)

    def masked(block: Block, model: int, delta: Tensor) -> Tensor:
        return _window(delta, stats.lower[model - 1], stats.upper[model - 1])

    def compiled(block: Block, model: int, x: Tensor, base: Tensor) -> fast_kernel.Mask:
        return fast_kernel.Mask.window(stats.lower[model - 1], stats.upper[model - 1])

    return masked_mix(xs, weights, params.normalize, params.scale, masked, stats.rescale, block, ties, compiled)


def breadcrumbs(xs: Sequence[Tensor], weights: Sequence[float], params: BreadcrumbsParams, stats: Sparsity | None,
                block: Block) -> Tensor:
    return _breadcrumbs(xs, weights, params, stats, block, ties=False)


def breadcrumbs_ties(xs: Sequence[Tensor], weights: Sequence[float], params: BreadcrumbsParams, stats: Sparsity | None,
                     block: Block) -> Tensor:
    return _breadcrumbs(xs, weights, params, stats, block, ties=True)


# SCE


class SceStatistic(NamedTuple):
    threshold: float | None  # keep elements whose variance across the task vectors reaches it; None: all
    weights: Tensor  # (models, 1) fp32: each task vector's share, from its mean square


def _variance_of(xs: Sequence[Tensor]) -> Tensor:
    """The fp32 variance of the task vectors of xs (base first, as stored): compiled where built, else
    _variance of the inputs widened."""
    compiled = fast_kernel.sce_variance(xs)
    if compiled is not None:
        return compiled
    xs = as_floats(xs)
    return _variance([x - xs[0] for x in xs[1:]])


def _variance(tvs: Sequence[Tensor]) -> Tensor:
    """mergekit's torch.var(torch.stack(tvs), dim=0, unbiased=False), bit for bit: the CPU kernel's
    Welford recurrence in float64, element by element over the models, written as whole-block ops.
    torch's own loop over so short a dimension cost ~140 ns per element (sce took 74x the disk's time)."""
    mean = torch.zeros(tvs[0].shape, dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    for count, tv in enumerate(tvs, start=1):
        x = tv.double()
        delta = x - mean
        mean += delta / count
        m2 += delta * (x - mean)
    return (m2 / len(tvs)).to(tvs[0].dtype)


def sce_statistic(blocks: Blocks, numel: int, params: SceParams, weights: Sequence[float]) -> SceStatistic:
    """The variance threshold keeping the top select_topk of the elements whose variance is nonzero,
    then each selected task vector's mean square over the tensor, normalised to sum 1."""
    threshold = None
    if params.select_topk < 1:
        variances = lambda: ([_variance_of(xs)] for _, xs in blocks())  # noqa: E731
        (threshold,) = kth_largest_abs(variances, lambda nonzero: int(nonzero * params.select_topk))
    squares: list[list[float]] | None = None
    for _, xs in blocks():
        block_sums = fast_kernel.sce_squares(xs, threshold)
        if block_sums is None:
            block_sums = [tv.square().double().sum().item() for tv in _sce_selected(xs, threshold)]
        squares = squares or [[] for _ in block_sums]
        for sums, block_sum in zip(squares, block_sums, strict=True):
            sums.append(block_sum)
    assert squares is not None  # a tensor with a statistic has a block
    means = torch.tensor([math.fsum(s) for s in squares], dtype=torch.float64).div(numel).float()
    total = torch.sum(means).item()
    shares = torch.ones_like(means) / len(means) if abs(total) < 1e-6 else means / total
    return SceStatistic(threshold, shares.unsqueeze(-1))


def _sce_selected(stored: Sequence[Tensor], threshold: float | None) -> list[Tensor]:
    xs = as_floats(stored)
    tvs = [x - xs[0] for x in xs[1:]]
    if threshold is None:
        return tvs
    keep = (_variance_of(xs).abs() >= threshold).to(tvs[0].dtype)
    return [tv * keep for tv in tvs]


def sce(xs: Sequence[Tensor], weights: Sequence[float], params: SceParams, stats: SceStatistic, block: Block) -> Tensor:
    """base + the task vectors' mean weighted by their shares, over those agreeing in sign. xs as stored
    (MethodSpec.stored_blocks)."""
    compiled = fast_kernel.sce_merge(xs, stats.threshold, stats.weights.flatten().tolist())
    if compiled is not None:
        return compiled
    xs = as_floats(xs)
    tvs = torch.stack(_sce_selected(xs, stats.threshold))
    erased = stats.weights * sign_consensus(tvs)
    return xs[0] + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
