"""DELLA (MagPrune) as mergekit 0.1.5 defines it: `della` and `della_linear`.

Each task vector (x_i - base) is masked at random, each element kept with a chance that grows with its
magnitude's rank within its row: density - epsilon for the smallest, density + epsilon for the largest,
evenly between. The kept elements are rescaled to the task vector's L1 norm (`rescale`, a whole-tensor
statistic from one `prepare` pass), then mixed as DARE's are (merge.methods.sparse.mix): summed
(della_linear) or summed where each agrees with the elected sign (della).

mergekit ranks along dimension 1 (a vector is one row); its rank arithmetic is repeated here op for
op in fp32, so a kept element's chance is bitwise mergekit's. A rank needs the whole row, so the
blocks of these methods are whole rows (MethodSpec.row_blocks): the draws are keyed by (seed, tensor,
input, row block), independent of chunking, workers and resumes. Ties in magnitude rank by position
(a stable sort); mergekit's sort leaves their order unspecified. Compiled (fast_pass.c della_keep), the
mask is decided for most elements from the rank range of their magnitude's bin, the same mask to the bit
(tests/test_merge_compiled_merges.py), in one pass where radix ranks were followed by torch's chance
arithmetic, draws and comparison (bench/merge_throughput.py, 3 x 1.1B: della 37.5 -> 22.6 s). The
statistic pass keeps each block's compiled mask, packed (a bit an element of the tensor, per task
vector: MethodSpec.held_mask_bits, counted by the plan), and the merge pass uses it instead of deciding
it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from merge.methods import fast_kernel
from merge.methods.blocks import Block, Blocks, Tensor, block_key, block_uniform
from merge.methods.sparse import Masking, random_mask_mix, random_mask_ratios
from merge.methods.specs import DellaParams, row_length


def keep_chances(delta: Tensor, shape: Sequence[int], density: float, epsilon: float) -> Tensor:
    """For a block of whole rows of a task vector (flat), each element's chance of being kept."""
    group = shape[1] if len(shape) >= 2 else row_length(shape)
    inner = row_length(shape) // group
    order = torch.argsort(delta.abs().reshape(-1, group, inner), dim=1, stable=True)
    # The inverse permutation by a scatter: what mergekit's second argsort gives, without a second sort.
    positions = torch.arange(group).view(1, group, 1).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(torch.float32) + 1
    # mergekit's normalisation, op for op (min 1 and max `group`, but computed as it computes them).
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(-1)


def _masked(params: DellaParams) -> Masking:
    def masked(block: Block, model: int, delta: Tensor) -> Tensor:
        chances = keep_chances(delta, block.shape, params.density, params.epsilon)
        return delta * (block_uniform(block, model) < chances).to(delta.dtype)

    return masked


def _compiled_keep(block: Block, model: int, x: Tensor, base: Tensor, params: DellaParams,
                   norms: bool = False) -> tuple[Tensor, tuple[float, float] | None] | None:
    """The compiled mask (fast_pass.c della_keep: most elements' decision without their exact rank) for a
    block of a matrix's rows or of a vector, and with `norms` the L1 norms of the task vector and of it
    masked; None for higher dimensions, which rank along dimension 1."""
    group = block.shape[1] if len(block.shape) >= 2 else row_length(block.shape)
    if row_length(block.shape) != group:
        return None
    return fast_kernel.della_keep(x, base, group, block_key(block, model), params.density, params.epsilon, norms)


class DellaStatistic(NamedTuple):
    ratios: list[Tensor | None]  # each task vector's L1 rescale factor
    # (block index, input position) -> the compiled keep mask the L1 pass decided, for the merge pass to
    # use (and drop) instead of deciding it again.
    masks: dict[tuple[int, int], Tensor]


def della_statistic(blocks: Blocks, numel: int, params: DellaParams, weights: Sequence[float]) -> DellaStatistic | None:
    masks: dict[tuple[int, int], Tensor] = {}

    def compiled(block: Block, model: int, x: Tensor, base: Tensor) -> tuple[float, float] | None:
        decided = _compiled_keep(block, model, x, base, params, norms=True)
        if decided is None:
            return None
        masks[block.index, model], norms = decided
        return norms

    ratios = random_mask_ratios(blocks, _masked(params), params, len(weights), compiled)
    return None if ratios is None else DellaStatistic(ratios, masks)


def _della(xs: Sequence[Tensor], weights: Sequence[float], params: DellaParams, stats: DellaStatistic | None,
           block: Block, ties: bool) -> Tensor:
    held = []  # the packed masks the compiled merge reads by address, alive until it has

    def compiled(block: Block, model: int, x: Tensor, base: Tensor) -> fast_kernel.Mask | None:
        keep = stats.masks.pop((block.index, model), None) if stats is not None else None
        if keep is None:
            decided = _compiled_keep(block, model, x, base, params)
            keep = decided[0] if decided is not None else None
        if keep is None:
            return None
        held.append(keep)
        return fast_kernel.Mask.given_by(keep)

    ratios = stats.ratios if stats is not None else None
    return random_mask_mix(xs, weights, params, _masked(params), ratios, block, ties, compiled)


def della(xs: Sequence[Tensor], weights: Sequence[float], params: DellaParams, stats: DellaStatistic | None,
          block: Block) -> Tensor:
    return _della(xs, weights, params, stats, block, ties=True)


def della_linear(xs: Sequence[Tensor], weights: Sequence[float], params: DellaParams, stats: DellaStatistic | None,
                 block: Block) -> Tensor:
    return _della(xs, weights, params, stats, block, ties=False)
