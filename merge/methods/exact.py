"""Correctly rounded linear combinations: round(sum_j c_j * y_j / d), rounded once.

A single rounding to the output dtype, for exact real coefficients c_j and divisor d (Fractions of the
float64 weights) and float inputs y_j.

Why not just fp32 or fp64 arithmetic: the exact weighted mean of bf16 inputs often lies exactly halfway
between two bf16 values (a uniform 3-model merge: ~0.6% of elements), and any rounding before the last
one (a weight normalised to w / sum(w), a product, a partial sum) can push such a tie to either side.
A bf16 (8-bit) input times a float64 (53-bit) weight needs 61 bits, so float64 is not exact either.

How: a fast pass in a wider precision (fp32 for 16-bit outputs, fp64 for fp32 outputs) computes the
result with a rigorous error bound; where the bound's interval rounds to one value, that value is the
correctly rounded one (rounding is monotonic). The few remaining elements, ties among them, are decided
exactly: the sign of sum_j c_j * y_j - m * d against the rounding boundary m is computed from
exact float64 products (constants rescaled to coprime integers, split into 26-bit halves) summed
error-free (Knuth's two-sum, distillation).
Exact as long as no product underflows float64 (weights of magnitude above ~1e-250).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import torch

from merge.methods import fast_kernel

Tensor = torch.Tensor
_UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
_TINY = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074}
# Inputs and output of the fast pass: 16-bit outputs are checked in fp32, fp32 outputs in fp64.
_FAST = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float64}
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_SPLIT = 134217729.0  # 2**27 + 1: Veltkamp's splitter for float64
# Elements per pass of the fast path: its temporaries stay in a core's L2 cache (on 3 bf16 inputs, one
# thread: 2**16-2**18 took 3.5-4 ns per element, 2**20 4-11 ns, depending on the allocator).
SLICE = 1 << 18
# Elements left unsure by the fast pass (mostly exact ties) are decided exactly in batches of about
# this many: large enough that the few dozen op calls of a decision are paid rarely, small enough to
# bound the decision's float64 temporaries (~100 bytes per element).
DECIDE_BATCH = 1 << 16


def expansion(q: Fraction) -> tuple[float, ...]:
    """Floats whose exact sum is q (largest first)."""
    parts = []
    while q:
        part = float(q)
        parts.append(part)
        q -= Fraction(part)
    return tuple(parts) or (0.0,)


def halves(x: float) -> tuple[float, float]:
    """x = high + low exactly, each with at most 26 significant bits (Veltkamp's split), so that its
    product with any fp32 value (24 bits), or a midpoint of two (25), is exact in float64."""
    c = _SPLIT * x
    high = c - (c - x)
    return high, x - high


def _narrow_parts(q: Fraction) -> tuple[float, ...]:
    return tuple(h for part in expansion(q) for h in halves(part) if h != 0.0) or (0.0,)


class _Plan(NamedTuple):
    """Per-tensor constants."""

    scaled: list[float]  # the fast pass's coefficients c_j / d
    factor: float  # its error bound, relative to sum_j |c_j y_j / d|
    absolute: float  # and absolute (subnormal products)
    overflow_risk: float  # a bound at least this large may hide an overflow of the fast type
    exact_coefficients: list[tuple[float, ...]]  # c_j and d rescaled, as sums of 26-bit floats
    exact_divisor: tuple[float, ...]
    positive: bool  # d > 0


def _plan(coefficients: Sequence[Fraction], divisor: Fraction, fast: torch.dtype) -> _Plan:
    # Keyed by integers: hashing a Fraction costs a modular exponentiation.
    key = tuple((c.numerator, c.denominator) for c in (*coefficients, divisor))
    return _cached_plan(key, fast)


@lru_cache(maxsize=256)
def _cached_plan(key: tuple[tuple[int, int], ...], fast: torch.dtype) -> _Plan:
    *coefficients, divisor = (Fraction(n, d) for n, d in key)
    inverse = 1 / divisor
    scaled = [float(c * inverse) for c in coefficients]
    u = _UNIT[fast]
    k = len(coefficients)
    # Each product carries the coefficient's rounding and its own (2u), the in-order sum k-1 more, the
    # bound's own computation and the endpoints' rounding a few more: 2k + 8 units is safe.
    factor = (2 * k + 8) * u
    # Subnormal products lose relative accuracy: an absolute error of one tiny per operation.
    absolute = (2 * k + 4) * _TINY[fast]
    overflow_risk = factor * torch.finfo(fast).max / 2
    # The exact decision compares sum_j c_j y_j with m * d; scaling every c_j and d by one positive
    # factor keeps the answer, and as coprime integers they are often tiny (a uniform mean of k: 1s
    # and k), so each is one float and the exact sums have k + 1 terms instead of 2k + 2 or more.
    unit = Fraction(math.lcm(*(c.denominator for c in (*coefficients, divisor))))
    unit /= math.gcd(*(int(c * unit) for c in (*coefficients, divisor)))
    integers = [c * unit for c in coefficients]
    return _Plan(
        scaled, factor, absolute, overflow_risk, [_narrow_parts(c) for c in integers], _narrow_parts(divisor * unit), divisor > 0
    )


def combine(
    ys: Sequence[Tensor], coefficients: Sequence[Fraction], divisor: Fraction, out_dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """sum_j coefficients[j] * ys[j] / divisor, correctly rounded (ties to even) to out_dtype; written
    into `out` (1-D, out_dtype) when given, which is returned.

    ys: same-shape 1-D tensors of fp32 or a narrower float type, in any mix (their values are the
    inputs'). Non-finite inputs give what plain arithmetic gives. Any length: the fast pass goes in
    cache-sized slices, the exact decisions in batches.
    """
    if divisor == 0:
        raise ValueError("divisor is 0")
    result = torch.empty(len(ys[0]), dtype=out_dtype) if out is None else out
    fast = _FAST.get(out_dtype)
    if fast is None:  # float64 output: no wider type to check against; plain float64 arithmetic
        scale = 1 / divisor
        return result.copy_(sum((y.double() * float(c * scale) for y, c in zip(ys, coefficients, strict=True)), torch.zeros(())))
    plan = _plan(coefficients, divisor, fast)
    compiled = fast_kernel.compiled_pass(plan, ys, result, fast)
    unsure: list[tuple[Tensor, Tensor, Tensor]] = []  # (positions, low values, estimates)
    pending = 0
    for start in range(0, len(result), SLICE):
        stop = min(start + SLICE, len(result))
        pieces, out = [y[start:stop] for y in ys], result[start:stop]
        where, low, estimate = compiled(pieces, out) if compiled is not None else _fast_pass(pieces, plan, out)
        if len(where):
            unsure.append((where + start, low, estimate))
            pending += len(where)
        if pending >= DECIDE_BATCH or (pending and stop == len(result)):
            where, low, estimate = (torch.cat(parts) for parts in zip(*unsure, strict=True))
            result[where] = _settle(ys, where, low, result[where], estimate, plan)
            unsure, pending = [], 0
    return result


def _fast_pass(ys: list[Tensor], plan: _Plan, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Writes the fast estimate's rounding into out; returns where that may be wrong, with the lower
    end of the error interval rounded there and the estimate (both needed to settle them). In torch
    ops; merge/methods/fast_pass.c is the same pass fused, used where it could be built.

    Inputs are read in their own dtype (add_ widens them on the fly): no converted copies. Every op
    here is vectorised; torch's comparisons of 16-bit floats are not, hence the integer views."""
    factor = plan.factor
    fast = _FAST[out.dtype]
    estimate = torch.zeros(len(out), dtype=fast)
    bound = torch.full((len(out),), plan.absolute, dtype=fast)
    magnitude = torch.empty_like(ys[0])
    for y, c in zip(ys, plan.scaled, strict=True):
        estimate.add_(y, alpha=c)
        bound.add_(torch.abs(y, out=magnitude) if y.dtype == magnitude.dtype else y.abs(), alpha=abs(c) * factor)
    # Partial sums stay below the fast type's largest value unless the bound says they may not; then an
    # infinite or NaN estimate may come from an overflow of that range (bf16 shares fp32's), not the value.
    overflow = bool(bound.max() >= plan.overflow_risk)
    low = torch.sub(estimate, bound).to(out.dtype)
    out.copy_(torch.add(estimate, bound, out=bound))
    bits = _BITS[out.dtype]
    differ = torch.sub(out.view(bits), low.view(bits))  # zero where both ends round alike
    if overflow:
        differ |= ~out.isfinite()
    where = differ.nonzero().squeeze(1)
    return where, low[where], estimate[where]


def _settle(ys: Sequence[Tensor], where: Tensor, low: Tensor, high: Tensor, estimate: Tensor, plan: _Plan) -> Tensor:
    """The correctly rounded values at `where`, given the fast pass's interval [low, high] there."""
    chosen = [y[where].double() for y in ys]
    finite = sum(chosen[1:], chosen[0]).isfinite()  # no overflow: every input is at most fp32
    exact = plan.exact_coefficients, plan.exact_divisor, plan.positive
    if bool(finite.all()):
        return _decide(chosen, low, high, *exact)
    result = estimate.to(high.dtype)  # non-finite inputs: what plain arithmetic gives
    result[finite] = _decide([y[finite] for y in chosen], low[finite], high[finite], *exact)
    return result


def round_to(values: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 values correctly rounded to dtype. torch rounds float64 to 16-bit types through fp32
    (two roundings); rounding to fp32 *to odd* first keeps enough bits for the second to be right."""
    if dtype in (torch.float32, torch.float64):
        return values.to(dtype)
    single = values.float()
    back = single.double()
    fix = (back != values) & values.isfinite() & ((single.view(torch.int32) & 1) == 0)
    if bool(fix.any()):
        toward = torch.where(values[fix] > back[fix], torch.inf, -torch.inf).float()
        single[fix] = torch.nextafter(single[fix], toward)
    return single.to(dtype)


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _distill(terms: list[Tensor], ratio: float = 1 + 2.0**-40) -> list[Tensor]:
    """The same exact sum (elementwise) rearranged so the last term outweighs all others together by
    `ratio`: error-free two-sum passes, repeated until that holds (each pass brings the last term
    closer to the rounded sum, the others to its error). The default ratio fixes the sign."""
    terms = list(terms)
    for _ in range(8 * len(terms) + 64):
        for i in range(1, len(terms)):
            terms[i], terms[i - 1] = _two_sum(terms[i - 1], terms[i])
        rest = sum((t.abs() for t in terms[:-1]), torch.zeros_like(terms[-1]))
        # rest is itself rounded (up to len(terms) units): the margin covers that.
        if bool(((terms[-1].abs() > rest * ratio) | (rest == 0)).all()):
            return terms
    raise RuntimeError("exact summation did not converge")


def _decide(
    ys: list[Tensor], low: Tensor, high: Tensor, coefficients: list[tuple[float, ...]], divisor: tuple[float, ...],
    positive: bool,
) -> Tensor:
    """The correctly rounded values of sum_j c_j y_j / d for a few elements whose value rounds to
    low, high, or (rarely: cancellation, overflow) something between, decided exactly."""
    # Every factor has at most 26 significant bits and every input at most 24: each product is exact.
    products = [y if part == 1 else y * part for y, parts in zip(ys, coefficients, strict=True) for part in parts]
    up = torch.nextafter(low, torch.full_like(low, torch.inf))
    adjacent = (up == high) & (low != high)  # low == high == inf: the fast type overflowed
    # The usual case: one boundary between two neighbours. A tie goes to the even one.
    above = _compare(products, divisor, positive, _midpoint(low, high, low))
    low_even = (low.view(_BITS[low.dtype]) & 1) == 0
    result = torch.where((above > 0) | ((above == 0) & ~low_even), high, low)
    if not bool(adjacent.all()):
        spread = (~adjacent).nonzero().squeeze(1)
        result[spread] = _walk([p[spread] for p in products], divisor, positive, low[spread])
    return result


def _walk(products: list[Tensor], divisor: tuple[float, ...], positive: bool, candidate: Tensor) -> Tensor:
    """From a nearby candidate, step one value at a time until both boundaries enclose the value."""
    products = _distill(products, ratio=2.0**30)
    candidate = round_to(products[-1] / sum(divisor), candidate.dtype)  # within an ulp or so of the answer
    bits = _BITS[candidate.dtype]
    for _ in range(64):
        up = torch.nextafter(candidate, torch.full_like(candidate, torch.inf))
        down = torch.nextafter(candidate, torch.full_like(candidate, -torch.inf))
        above = _compare(products, divisor, positive, _midpoint(candidate, up, down))
        below = _compare(products, divisor, positive, _midpoint(candidate, down, up))
        odd = (candidate.view(bits) & 1) == 1
        go_up = (above > 0) | ((above == 0) & odd)
        go_down = ~go_up & ((below < 0) | ((below == 0) & odd))
        if not bool((go_up | go_down).any()):
            return candidate
        candidate = torch.where(go_up, up, torch.where(go_down, down, candidate))
    raise RuntimeError("exact rounding did not converge")


def _midpoint(value: Tensor, neighbour: Tensor, other: Tensor) -> Tensor:
    """The rounding boundary between value and its neighbour (one of them finite), in float64: exact,
    since it needs one bit more than the output dtype. Between the largest finite value and infinity
    it lies half an ulp past the largest finite value, where rounding starts to overflow."""
    v, n = value.double(), neighbour.double()
    middle = (v + n) / 2
    if bool(middle.isfinite().all()):
        return middle
    o = other.double()
    inward = torch.nextafter(neighbour, torch.zeros_like(neighbour)).double()
    return torch.where(
        v.isinf(), n + (n - inward) / 2, torch.where(n.isinf(), v + (v - o) / 2, (v + n) / 2)
    )


def _compare(products: list[Tensor], divisor: tuple[float, ...], positive: bool, boundary: Tensor) -> Tensor:
    """sign(exact value - boundary), elementwise."""
    finite = boundary.isfinite()
    everywhere = bool(finite.all())
    m = boundary if everywhere else torch.where(finite, boundary, 0.0)
    terms = list(products)
    terms += [m * -part for part in divisor]  # exact: a midpoint has at most 25 bits
    sign = torch.sign(_distill(terms)[-1])
    sign = sign if positive else sign.neg_()
    return sign if everywhere else torch.where(finite, sign, -torch.sign(boundary))
