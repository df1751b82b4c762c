"""merge.methods.exact against a reference built from Python Fractions: every element of sum_j c_j y_j / d
rounded once, ties to even, on inputs chosen to be hard (ties, cancellation, subnormals, overflow)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from merge.methods import exact, fast_kernel


@pytest.fixture(params=["compiled", "torch"], autouse=True)
def fast_pass(request, monkeypatch):
    """Every test runs twice: with merge/methods/fast_pass.c and with the torch ops used where no C compiler is."""
    if request.param == "torch":
        monkeypatch.setattr(fast_kernel, "library", lambda: None)
    elif fast_kernel.library() is None:
        pytest.skip("no C compiler here: the compiled fast pass could not be built")
    return request.param


def mantissa_bits(dtype: torch.dtype) -> int:
    return -int(math.log2(torch.finfo(dtype).eps))


def reference_round(q: Fraction, dtype: torch.dtype) -> float:
    """q rounded to nearest (ties to even) in dtype, overflow to infinity, decided with Fractions."""
    info = torch.finfo(dtype)
    largest = Fraction(info.max)
    half_ulp_of_largest = Fraction(2) ** (math.floor(math.log2(info.max)) - mantissa_bits(dtype)) / 2
    if abs(q) >= largest + half_ulp_of_largest:
        return math.copysign(math.inf, q)
    near = torch.tensor(float(q), dtype=torch.float64).to(dtype).clamp(-info.max, info.max)
    candidates = [near, torch.nextafter(near, torch.tensor(math.inf, dtype=dtype)),
                  torch.nextafter(near, torch.tensor(-math.inf, dtype=dtype))]
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]

    def distance(v: torch.Tensor) -> tuple[Fraction, int]:
        return abs(Fraction(v.item()) - q), int(v.view(bits).item()) & 1

    best = min((v for v in candidates if v.isfinite()), key=distance)
    return best.item()


def hard_values(generator: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A mix: narrow exponents (many ties), the full exponent range, subnormals, zeros, the largest values."""
    info = torch.finfo(dtype)
    kind = torch.randint(0, 5, (n,), generator=generator)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    mantissa = 1 + torch.rand(n, generator=generator).double()
    low, high = math.log2(info.smallest_normal), math.log2(info.max)
    wide = torch.randint(int(low) - mantissa_bits(dtype), int(high), (n,), generator=generator).double()
    narrow = torch.randint(-4, 1, (n,), generator=generator).double()
    exponent = torch.where(kind == 0, narrow, torch.where(kind == 1, wide, torch.full((n,), high - 1)))
    values = sign * mantissa * 2.0**exponent
    values = torch.where(kind == 3, 0.0, values)
    values = torch.where(kind == 4, sign * info.smallest_normal * torch.rand(n, generator=generator).double(), values)
    return values.to(dtype).nan_to_num(posinf=info.max, neginf=-info.max)


CASES = [  # (coefficients, divisor)
    ([Fraction(1 / 3)] * 3, Fraction(1 / 3) * 3),  # a uniform 3-model mean, as LinearParams gives it
    ([Fraction(1)] * 2, Fraction(2)),
    ([Fraction(0.5), Fraction(0.3), Fraction(0.2)], Fraction(1)),
    ([Fraction(2), Fraction(-1)], Fraction(1)),  # task arithmetic: base and one fine-tune, lambda 1
    ([Fraction(-0.25), Fraction(1.5), Fraction(1e-3)], Fraction(1.25)),
    ([Fraction(3), Fraction(3)], Fraction(1)),  # overflows near the largest values
]


@pytest.mark.parametrize("in_dtype,out_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
    ((torch.bfloat16, torch.float32, torch.float16), torch.bfloat16),  # inputs of mixed dtypes
])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_combine_is_correctly_rounded(in_dtype, out_dtype, case, monkeypatch):
    # Small slices and batches, so that several of each, and their boundaries, are exercised.
    monkeypatch.setattr(exact, "SLICE", 384)
    monkeypatch.setattr(exact, "DECIDE_BATCH", 100)
    coefficients, divisor = CASES[case]
    generator = torch.Generator().manual_seed(case)
    n = 1500
    in_dtypes = in_dtype if isinstance(in_dtype, tuple) else (in_dtype,) * len(coefficients)
    ys = [hard_values(generator, n, dtype) for dtype, _ in zip(in_dtypes, coefficients, strict=False)]
    # Exact cancellation between the first two inputs in some elements.
    cancel = torch.arange(n) % 7 == 0
    ys[1] = torch.where(cancel, -ys[0], ys[1])
    got = exact.combine(ys, coefficients, divisor, out_dtype)
    assert got.dtype == out_dtype and got.shape == (n,)
    columns = [[Fraction(v) for v in y.double().tolist()] for y in ys]
    for i in range(n):
        q = sum(c * column[i] for c, column in zip(coefficients, columns, strict=True)) / divisor
        expected = reference_round(q, out_dtype)
        assert got[i].item() == expected, (i, [y[i].item() for y in ys], got[i].item(), expected)


def test_non_finite_inputs_give_what_plain_arithmetic_gives():
    inf, nan = math.inf, math.nan
    a = torch.tensor([inf, inf, nan, 1.0, -inf], dtype=torch.bfloat16)
    b = torch.tensor([1.0, -inf, 1.0, inf, -inf], dtype=torch.bfloat16)
    got = exact.combine([a, b], [Fraction(1), Fraction(1)], Fraction(2), torch.bfloat16)
    assert got[0].item() == inf and math.isnan(got[1].item()) and math.isnan(got[2].item())
    assert got[3].item() == inf and got[4].item() == -inf


def test_integer_reduction_keeps_the_value():
    """The plan rescales coefficients and divisor to coprime integers; the value must not change."""
    ys = [torch.tensor([-0.042724609375], dtype=torch.bfloat16), torch.tensor([0.00860595703125], dtype=torch.bfloat16),
          torch.tensor([-0.005523681640625], dtype=torch.bfloat16)]
    third = Fraction(1 / 3)
    got = exact.combine(ys, [third] * 3, third * 3, torch.bfloat16)
    assert got.item() == -0.01318359375  # the tie: -0.013214111328125 rounds to even


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_one_input_rounds_like_a_conversion(out_dtype):
    """sum of 1 * y is y rounded once: fp32 bit patterns of every exponent, NaN, infinities and
    subnormals, each rounded as torch's conversion rounds (correctly, ties to even)."""
    generator = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31, (200_000,), generator=generator, dtype=torch.int64).to(torch.int32)
    # Many near ties too: the low 16 or 13 bits exactly half, or one off.
    bits[::3] = (bits[::3] & ~0xFFFF) | 0x8000
    bits[1::3] = (bits[1::3] & ~0x1FFF) | 0x1000
    y = bits.view(torch.float32)
    got = exact.combine([y], [Fraction(1)], Fraction(1), out_dtype)
    expected = y.to(out_dtype)
    finite = expected.isfinite() | expected.isinf()
    assert torch.equal(got[finite].view(torch.int16), expected[finite].view(torch.int16))
    assert bool(got[~finite].isnan().all())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_combine_writes_into_out_what_it_would_return(out_dtype):
    """The merge hands each piece's slice of the output buffer as out=: same bits, no other tensor."""
    generator = torch.Generator().manual_seed(2)
    ys = [torch.randn(70_001, generator=generator).to(torch.bfloat16) for _ in range(3)]
    coefficients, divisor = [Fraction(1), Fraction(2), Fraction(4)], Fraction(7)
    buffer = torch.full((70_101,), 99.0, dtype=out_dtype)
    out = buffer[50:70_051]
    returned = exact.combine(ys, coefficients, divisor, out_dtype, out=out)
    assert returned.data_ptr() == out.data_ptr()
    assert torch.equal(out, exact.combine(ys, coefficients, divisor, out_dtype))
    assert bool((buffer[:50] == 99).all()) and bool((buffer[70_051:] == 99).all())


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_input_is_read_exactly(in_dtype):
    y = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(in_dtype)
    got = exact.combine([y], [Fraction(1)], Fraction(1), torch.float32)
    number = ~y.isnan()
    assert torch.equal(got[number], y[number].float()) and bool(got[~number].isnan().all())
