"""Correctly rounded linear combinations: round(sum_j c_j * y_j / d) with a single rounding to the
output dtype, for exact real coefficients c_j and divisor d (Fractions of the float64 weights) and
float inputs y_j.

Why not just fp32 or fp64 arithmetic: the exact weighted mean of bf16 inputs often lies exactly halfway
between two bf16 values (a uniform 3-model merge: ~0.6% of elements), and any rounding before the last
one (a weight normalised to w / sum(w), a product, a partial sum) can push such a tie to either side.
A bf16 (8-bit) input times a float64 (53-bit) weight needs 61 bits, so float64 is not exact either.

How: a fast pass in a wider precision (fp32 for 16-bit outputs, fp64 for fp32 outputs) computes the
result with a rigorous error bound; where the bound's interval rounds to one value, that value is the
correctly rounded one (rounding is monotonic). The few remaining elements, ties among them, are decided
exactly: the sign of sum_j c_j * y_j - m * d against the rounding boundary m is computed from
exact float64 products (constants split into 26-bit halves) summed error-free (Knuth's two-sum,
distillation).
Exact as long as no product underflows float64 (weights of magnitude above ~1e-250).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

import torch

Tensor = torch.Tensor
_UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
_TINY = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074}
# Inputs and output of the fast pass: 16-bit outputs are checked in fp32, fp32 outputs in fp64.
_FAST = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float64}
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_SPLIT = 134217729.0  # 2**27 + 1: Veltkamp's splitter for float64
# Elements per pass of the fast path. Smaller slices keep its temporaries in a core's L2 cache, but
# each pays a few dozen op calls and usually one exact decision of its ties: on 2**23 bf16 elements
# (3-model mean, one thread) 2**15 took 30 ns per element, 2**18 17 ns, 2**20 13 ns; plain fp32
# arithmetic 4.5 ns. merge.stream hands over one BLOCK (2**18) at a time.
SLICE = 1 << 20


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


def _plan(coefficients: Sequence[Fraction], divisor: Fraction, fast: torch.dtype) -> tuple:
    # Keyed by integers: hashing a Fraction costs a modular exponentiation.
    key = tuple((c.numerator, c.denominator) for c in (*coefficients, divisor))
    return _cached_plan(key, fast)


@lru_cache(maxsize=256)
def _cached_plan(key: tuple[tuple[int, int], ...], fast: torch.dtype) -> tuple:
    """Per-tensor constants: the fast pass's coefficients and error factor, and exact expansions."""
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
    return scaled, factor, absolute, [_narrow_parts(c) for c in coefficients], _narrow_parts(divisor), divisor > 0


def combine(
    ys: Sequence[Tensor], coefficients: Sequence[Fraction], divisor: Fraction, out_dtype: torch.dtype
) -> Tensor:
    """sum_j coefficients[j] * ys[j] / divisor, correctly rounded (ties to even) to out_dtype.

    ys: same-shape 1-D tensors of fp32 or a narrower float type (their values are the inputs'). Non-finite
    inputs give what plain arithmetic gives. Long inputs go in cache-sized slices.
    """
    if len(ys[0]) > SLICE:
        out = torch.empty(len(ys[0]), dtype=out_dtype)
        for start in range(0, len(ys[0]), SLICE):
            out[start : start + SLICE] = combine([y[start : start + SLICE] for y in ys], coefficients, divisor, out_dtype)
        return out
    if divisor == 0:
        raise ValueError("divisor is 0")
    fast = _FAST.get(out_dtype)
    if fast is None:  # float64 output: no wider type to check against; plain float64 arithmetic
        scale = 1 / divisor
        return sum((y.double() * float(c * scale) for y, c in zip(ys, coefficients, strict=True)), torch.zeros(()))
    scaled, factor, absolute, exact_c, exact_d, positive = _plan(coefficients, divisor, fast)
    ys_fast = [y.to(fast) for y in ys]
    estimate = torch.zeros_like(ys_fast[0])
    bound = torch.zeros_like(ys_fast[0])
    for y, c in zip(ys_fast, scaled, strict=True):
        term = y * c
        estimate += term
        bound += term.abs_()
    bound.mul_(factor).add_(absolute)
    low = (estimate - bound).to(out_dtype)
    result = (estimate + bound).to(out_dtype)
    unsure = result != low
    if bool(unsure.any()):
        where = unsure.nonzero().squeeze(1)
        finite = torch.stack([y[where] for y in ys_fast]).isfinite().all(0)
        exact, loose = where[finite], where[~finite]
        if len(exact):
            result[exact] = _decide([y[exact].double() for y in ys], low[exact], result[exact], exact_c, exact_d, positive)
        result[loose] = estimate[loose].to(out_dtype)
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
    products = [y * part for y, parts in zip(ys, coefficients, strict=True) for part in parts]
    up = torch.nextafter(low, torch.full_like(low, torch.inf))
    adjacent = up == high
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
    v, n, o = value.double(), neighbour.double(), other.double()
    inward = torch.nextafter(neighbour, torch.zeros_like(neighbour)).double()
    return torch.where(
        v.isinf(), n + (n - inward) / 2, torch.where(n.isinf(), v + (v - o) / 2, (v + n) / 2)
    )


def _compare(products: list[Tensor], divisor: tuple[float, ...], positive: bool, boundary: Tensor) -> Tensor:
    """sign(exact value - boundary), elementwise."""
    finite = boundary.isfinite()
    m = torch.where(finite, boundary, 0.0)
    terms = list(products)
    terms += [m * -part for part in divisor]  # exact: a midpoint has at most 25 bits
    sign = torch.sign(_distill(terms)[-1])
    sign = sign if positive else -sign
    return torch.where(finite, sign, -torch.sign(boundary))
