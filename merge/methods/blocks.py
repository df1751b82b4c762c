"""What a merge method sees: one block of every input (`Block`), and the shape of a method (`Method`).

Blocks are fixed ranges of the flattened tensor (BLOCK elements, or whole rows for a method ranking
within rows: merge.methods.specs.block_elements), never chunk-dependent, so a method's seeded
randomness, drawn per (seed, tensor, input, block), does not depend on chunking, workers or resumes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merge.methods.specs import MethodSpec

Tensor = torch.Tensor


@dataclass(frozen=True)
class Block:
    """Which part of which tensor a combine call sees; seeded randomness derives from this alone."""

    tensor: str
    index: int
    size: int
    seed: int
    out_dtype: torch.dtype = torch.float32  # what the result is rounded to
    shape: tuple[int, ...] = ()  # the whole tensor's: where its rows lie (not part of the random key)


# One pass over a tensor: every block in order, with the fp32 values of each input there.
Blocks = Callable[[], Iterator[tuple[Block, list[Tensor]]]]


@dataclass(frozen=True)
class Method:
    spec: MethodSpec
    # combine(xs, weights, params, statistic, block) -> the block's fp32 result.
    combine: Callable[[Sequence[Tensor], Sequence[float], Any, Any, Block], Tensor]
    # prepare(blocks, numel, params, weights) -> the whole-tensor statistic, from `spec.reads - 1`
    # passes over the blocks (None: no statistic).
    prepare: Callable[[Blocks, int, Any, Sequence[float]], Any] | None = None


def block_uniform(block: Block, model: int) -> Tensor:
    """Uniform [0, 1) draws for one input's block, from a generator seeded by (seed, tensor, input
    position, block index). Python's hash() is salted per process, so blake2b."""
    key = f"{block.seed}\0{block.tensor}\0{model}\0{block.index}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return torch.rand(block.size, generator=torch.Generator().manual_seed(seed))
