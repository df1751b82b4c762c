"""Merges on the sphere, as mergekit 0.1.5 defines them: Model Stock, Multi-SLERP, NuSLERP, Karcher mean.

Everything they need of the whole tensor is the Gram matrix of the inputs (or of their task vectors):
norms, angles, and for the Karcher mean the whole Riemannian iteration, whose running mean is always a
combination of the inputs (mean = sum_j beta_j u_j), so it iterates on the coefficients. One pass
computes the Gram matrix in fp64 (`gram`); the scalars follow in mergekit's fp32 ops from its entries
rounded to fp32 (mergekit's own fp32 reductions may differ from that by an ulp); the elementwise
steps are mergekit's in its order, so a block gives what mergekit gives on the whole tensor.

With an optional base (Multi-SLERP, NuSLERP) the method gets it as xs[0] when the weights are one
fewer than the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from merge.methods import fast_kernel
from merge.methods.blocks import Block, Blocks, Tensor, as_floats
from merge.methods.specs import KarcherParams, ModelStockParams, MultiSlerpParams, NuSlerpParams


def _vectors(xs: Sequence[Tensor], base: bool) -> list[Tensor]:
    return [x - xs[0] for x in xs[1:]] if base else list(xs)


def _has_base(xs_count: int, weights: Sequence[float]) -> bool:
    return xs_count == len(weights) + 1


def gram(blocks: Blocks, base: bool | Sequence[float]) -> list[list[float]]:
    """G[i][j] = <v_i, v_j> over the whole tensor, v the inputs or (base) their task vectors; each
    block's dot product in fp64 (fast_pass.c's gram_block, every pair in one pass over the block, else
    torch.dot), the blocks' added with math.fsum, so chunking changes nothing.
    base: whether xs[0] is a base, or the weights, which tell (one fewer than the inputs: a base)."""
    parts: list[list[list[float]]] = []
    for _, stored in blocks():
        has_base = base if isinstance(base, bool) else _has_base(len(stored), base)
        compiled = fast_kernel.gram_block(stored, has_base)
        vs = [v.double() for v in _vectors(as_floats(stored), has_base)] if compiled is None else []
        count = len(stored) - int(has_base)
        parts = parts or [[[] for _ in range(count)] for _ in range(count)]
        for i in range(count):
            for j in range(i, count):
                parts[i][j].append(compiled[i][j] if compiled is not None else torch.dot(vs[i], vs[j]).item())
    n = len(parts)
    return [[math.fsum(parts[min(i, j)][max(i, j)]) for j in range(n)] for i in range(n)]


def _f32(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _norms(g: list[list[float]]) -> list[Tensor]:
    return [_f32(math.sqrt(g[i][i])) for i in range(len(g))]


# Model Stock


def model_stock_ratio(blocks: Blocks, numel: int, params: ModelStockParams, weights: Sequence[float]) -> Tensor:
    """t of Model Stock: N cos / (1 + (N - 1) cos), cos the mean cosine between the task vectors;
    0 (the base) where the denominator vanishes."""
    g = gram(blocks, base=True)
    norms = _norms(g)
    cosines = [
        (_f32(g[i][j]) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(g)) for j in range(i + 1, len(g))
    ]
    cos = torch.stack(cosines).mean(dim=0)
    count = len(g)
    denominator = 1 + (count - 1) * cos
    if denominator.abs() < 1e-6:
        return torch.zeros_like(cos)
    return (count * cos) / denominator


def model_stock(xs: Sequence[Tensor], weights: Sequence[float], params: ModelStockParams, t: Tensor, block: Block) -> Tensor:
    """t * (the fine-tunes' average) + (1 - t) * base."""
    average = sum(xs[1:]) / (len(xs) - 1)
    return t * average + (1 - t) * xs[0]


# Multi-SLERP


class MultiSlerpStatistic(NamedTuple):
    weights: Tensor  # (models, 1) fp32, normalised if asked
    divisors: Tensor  # (models, 1): each vector's norm + eps
    mean_norm: Tensor | None  # None: the weighted mean vanishes; two inputs fall back to linear
    dots: Tensor  # (models, 1): each unit vector's cosine with the mean direction
    cos: Tensor  # of the tangent's length
    sin_ratio: Tensor  # sin(length) / length
    norm: Tensor  # the weighted mean of the norms: the result's length


def multislerp_statistic(
    blocks: Blocks, numel: int, params: MultiSlerpParams, weights: Sequence[float]
) -> MultiSlerpStatistic | None:
    if len(weights) == 1:
        return None
    g = gram(blocks, weights)
    w = torch.tensor(list(weights), dtype=torch.float32)
    if params.normalize_weights:
        w = w / w.sum()
    norms = torch.stack(_norms(g))
    divisors = norms + params.eps
    c = [float(wi) / float(di) for wi, di in zip(w, divisors, strict=True)]  # unit vector i enters the mean as c_i u_i
    n = len(g)
    square = math.fsum(c[i] * c[j] * g[i][j] for i in range(n) for j in range(n))
    mean_norm = _f32(math.sqrt(max(square, 0.0)))
    if mean_norm < params.eps:
        if n != 2:
            raise ValueError("multislerp: the weighted sum of the inputs is zero (antipodal inputs balanced by "
                             "their weights); use other weights")
        return MultiSlerpStatistic(w.unsqueeze(-1), divisors.unsqueeze(-1), None, w, w, w, w)
    dots = [math.fsum(c[j] * g[i][j] for j in range(n)) / float(divisors[i]) / float(mean_norm) for i in range(n)]
    # The weighted tangent of the mean's own direction is zero in exact arithmetic; mergekit's fp32
    # norm of its rounding noise (~1e-7) plus eps leaves cos and sin(x)/x at 1.0 in fp32, as here.
    length = _f32(0.0) + params.eps
    return MultiSlerpStatistic(
        w.unsqueeze(-1), divisors.unsqueeze(-1), mean_norm, torch.tensor(dots, dtype=torch.float32).unsqueeze(-1),
        torch.cos(length), torch.sin(length) / length, (norms * w).sum(),
    )


def multislerp(xs: Sequence[Tensor], weights: Sequence[float], params: MultiSlerpParams, stats: MultiSlerpStatistic | None,
               block: Block) -> Tensor:
    """Barycentric interpolation on the sphere: the inputs' (or task vectors') unit vectors averaged
    with the weights, mapped back to the sphere at the mean and scaled to their weighted mean norm."""
    base = _has_base(len(xs), weights)
    if stats is None:  # one model besides any base: mergekit returns it as it is
        return xs[-1]
    compiled = fast_kernel.multislerp_merge(xs, base, stats.weights, stats.divisors, stats.dots, stats.mean_norm,
                                            stats.cos, stats.sin_ratio, stats.norm)
    if compiled is not None:
        return compiled
    vs = torch.stack(_vectors(xs, base))
    if stats.mean_norm is None:
        result = vs[0] * stats.weights[0] + vs[1] * stats.weights[1]
    else:
        units = vs / stats.divisors
        mean = (units * stats.weights).sum(0) / stats.mean_norm
        tangent = ((units - stats.dots * mean) * stats.weights).sum(0)
        result = (mean * stats.cos + tangent * stats.sin_ratio) * stats.norm
    return result + xs[0] if base else result


# NuSLERP


def nuslerp_t(weights: Sequence[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


class NuSlerpStatistic(NamedTuple):
    colinear: bool
    a: Tensor  # coefficient of the first vector
    b: Tensor  # of the second
    divisor: Tensor  # sin(theta)


def nuslerp_statistic(blocks: Blocks, numel: int, params: NuSlerpParams, weights: Sequence[float]) -> NuSlerpStatistic:
    """The angle between the two (flattened) inputs or task vectors, as mergekit's nuslerp computes it."""
    g = gram(blocks, weights)
    n0, n1 = (n.clamp(min=1e-7) for n in _norms(g))
    cos = (_f32(g[0][1] / float(n0) / float(n1))).clamp(-1, 1)
    colinear = bool((1 - cos.square()) <= 1e-8**2)
    t = nuslerp_t(weights)
    theta = torch.acos(torch.where(torch.tensor(colinear), 0, cos))
    return NuSlerpStatistic(colinear, torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta))


def nuslerp(xs: Sequence[Tensor], weights: Sequence[float], params: NuSlerpParams, stats: NuSlerpStatistic,
            block: Block) -> Tensor:
    base = _has_base(len(xs), weights)
    v0, v1 = _vectors(xs, base)
    if stats.colinear:
        t = nuslerp_t(weights)
        result = (1 - t) * v0 + t * v1
    else:
        result = (stats.a * v0 + stats.b * v1) / stats.divisor
    return xs[0] + result if base else result


# Karcher mean


class KarcherStatistic(NamedTuple):
    norms: list[Tensor]  # fp32, of each input
    coefficients: list[Tensor]  # fp32: the result is sum_j coefficients[j] * (x_j / norms[j])
    scale: Tensor


def karcher_statistic(blocks: Blocks, numel: int, params: KarcherParams, weights: Sequence[float]) -> KarcherStatistic:
    """mergekit's weighted Karcher mean on the unit sphere (uniform weights), iterated on the
    coefficients of the mean in the inputs' unit vectors, with their Gram matrix for every dot product."""
    g = gram(blocks, base=False)
    n = len(g)
    norms = _norms(g)
    alphas = [1.0 / n] * n
    tol = params.tol
    valid = [i for i in range(n) if float(norms[i]) > tol]
    scale = sum(a * norm for a, norm in zip(alphas, norms, strict=True))
    if not valid:
        return KarcherStatistic(norms, [_f32(0.0)] * n, scale)
    total = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / total for i in valid}
    unit = [[g[i][j] / (float(norms[i]) * float(norms[j])) if i in a and j in a else 0.0 for j in range(n)] for i in range(n)]

    def dot(u: list[float], v: list[float]) -> float:
        return math.fsum(u[i] * unit[i][j] * v[j] for i in range(n) for j in range(n))

    beta = [a.get(i, 0.0) for i in range(n)]
    length = math.sqrt(max(dot(beta, beta), 0.0))
    beta = [1.0 if i == valid[0] else 0.0 for i in range(n)] if length < tol else [b / length for b in beta]
    for _ in range(params.max_iter):
        tangent = [0.0] * n
        for i, alpha in a.items():
            cos = min(max(math.fsum(beta[j] * unit[j][i] for j in range(n)), -1.0), 1.0)
            theta = math.acos(cos)
            if theta < tol:
                continue
            factor = alpha * theta / math.sin(theta)
            tangent = [t + factor * ((1.0 if j == i else 0.0) - cos * beta[j]) for j, t in enumerate(tangent)]
        step = math.sqrt(max(dot(tangent, tangent), 0.0))
        if step < tol:
            break
        beta = [math.cos(step) * b + math.sin(step) * t / step for b, t in zip(beta, tangent, strict=True)]
        length = math.sqrt(max(dot(beta, beta), 0.0))
        if length > tol:
            beta = [b / length for b in beta]
    return KarcherStatistic(norms, [_f32(b) for b in beta], scale)


def karcher(xs: Sequence[Tensor], weights: Sequence[float], params: KarcherParams, stats: KarcherStatistic,
            block: Block) -> Tensor:
    """The Karcher (Riemannian) mean direction of the inputs, scaled to their mean norm."""
    if len(xs) == 1:
        return xs[0]
    mean = torch.zeros_like(xs[0])
    for x, norm, c in zip(xs, stats.norms, stats.coefficients, strict=True):
        if float(c) != 0.0 and float(norm) != 0.0:
            mean += c * (x / norm)
    return stats.scale * mean
