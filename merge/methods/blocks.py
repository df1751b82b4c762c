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

from merge.methods import fast_kernel
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


# One pass over a tensor (a statistic's): every block in order, with each input's values there as stored
# (bfloat16, float16 or float32): the magnitude histograms count bfloat16 as it is; what needs fp32
# widens it (as_floats). The merge pass's combine gets fp32 blocks.
Blocks = Callable[[], Iterator[tuple[Block, list[Tensor]]]]


def as_floats(xs: Sequence[Tensor]) -> list[Tensor]:
    """A block's inputs in fp32 (no copy of those already fp32)."""
    return [x.float() for x in xs]


@dataclass(frozen=True)
class Method:
    spec: MethodSpec
    # combine(xs, weights, params, statistic, block) -> the block's fp32 result.
    combine: Callable[[Sequence[Tensor], Sequence[float], Any, Any, Block], Tensor]
    # prepare(blocks, numel, params, weights) -> the whole-tensor statistic, from `spec.reads - 1`
    # passes over the blocks (None: no statistic).
    prepare: Callable[[Blocks, int, Any, Sequence[float]], Any] | None = None


def block_key(block: Block, model: int) -> int:
    """The 64-bit key of one input's draws in a block: (seed, tensor, input position, block index) hashed.
    Python's hash() is salted per process, so blake2b."""
    key = f"{block.seed}\0{block.tensor}\0{model}\0{block.index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def block_uniform(block: Block, model: int) -> Tensor:
    """Uniform [0, 1) fp32 draws for one input's block (uniform_draws of its block_key)."""
    key = block_key(block, model)
    compiled = fast_kernel.uniform_draws(key, block.size)
    return compiled if compiled is not None else uniform_draws(key, block.size)


# SplitMix64's constants: its step (2^64 / the golden ratio) and its output function's multipliers.
_STEP, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shifted(z: Tensor, bits: int) -> Tensor:
    """The logical right shift of int64 bits (torch's >> keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_draws(key: int, n: int) -> Tensor:
    """Draw i is SplitMix64's output function of key + (i + 1) * its step, top 24 bits as a float in
    [0, 1): each draw a function of (key, i) alone, so fast_pass.c computes them in a vectorised loop
    (a torch.Generator drew 7 ns an element, the largest part of DARE's merge). int64 products wrap as
    the C's uint64 ones do."""
    z = torch.arange(1, n + 1, dtype=torch.int64) * _int64(_STEP) + _int64(key)
    z = (z ^ _shifted(z, 30)) * _int64(_MIX1)
    z = (z ^ _shifted(z, 27)) * _int64(_MIX2)
    z = z ^ _shifted(z, 31)
    return _shifted(z, 40).to(torch.float32) * 2.0**-24
