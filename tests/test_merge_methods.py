"""Every merge method, run through the whole job with small chunks, against a direct whole-tensor
computation of its formula: the outputs must be bit-identical."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from merge_fixtures import (
    BIG_SHAPES,
    budget_for_blocks,
    exact_bf16,
    random_tensors,
    raw_checkpoint,
    read_merged,
    round_to_bf16,
    weighted_sum,
)

from merge.job import run_merge
from merge.merge_config import validate_config
from merge.methods.registry import METHODS, Block, dare_keep, kth_largest_abs
from merge.methods.specs import BLOCK, SPECS

NAMES = ["m0", "m1", "m2"]
# The costliest tensor per element is the int64 buffer: 3 output copies and 2 of its one input, 8 bytes each.
PER_ELEMENT = 3 * 8 + 2 * 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three bf16 checkpoints whose tensors span several blocks, plus an integer buffer that differs."""
    root = tmp_path_factory.mktemp("inputs")
    models = []
    for seed, name in enumerate(NAMES):
        tensors = random_tensors(seed, BIG_SHAPES)
        tensors["buf.ids"] = torch.arange(10, dtype=torch.int64) + 100 * seed
        raw_checkpoint(root / name, tensors, shards=2)
        models.append(tensors)
    return root, models


def merge(root, tmp_path, blocks: int = 1, **settings) -> dict[str, torch.Tensor]:
    cfg = validate_config({
        "models": [{"path": str(root / n)} for n in NAMES[: settings.pop("count", 3)]],
        "output": {"path": str(tmp_path / "out"), **settings.pop("output", {})},
        "memory_budget": budget_for_blocks(blocks, PER_ELEMENT),
        **settings,
    })
    run_merge(cfg, show_progress=False, log=lambda _: None)
    return read_merged(tmp_path / "out")


def floats(models, name):
    return [m[name] for m in models]


def test_linear_is_the_exact_weighted_mean_rounded_once(inputs, tmp_path):
    # Integer weights: products and sums of bf16 values are exact in float64 and the one division
    # by 10 cannot land on a rounding boundary unless the mean itself does, so this reference is exact.
    root, models = inputs
    out = merge(root, tmp_path, method="linear", weights=[2.0, 5.0, 3.0], integer_tensors_from="m2")
    for name in BIG_SHAPES:
        exact = sum(x.double() * w for x, w in zip(floats(models, name), [2, 5, 3], strict=True)) / 10
        assert torch.equal(out[name], round_to_bf16(exact)), name
    assert torch.equal(out["buf.ids"], models[2]["buf.ids"])
    assert set(out) == set(models[0])


def test_uniform_merge_rounds_ties_to_even(tmp_path):
    """The issue's example: the exact mean -0.013214111328125 lies halfway between two bf16 values;
    weights normalized first (1/3 each) pushed it off centre and to the odd one."""
    values = [-0.042724609375, 0.00860595703125, -0.005523681640625]
    for name, v in zip(NAMES, values, strict=True):
        raw_checkpoint(tmp_path / name, {"w": torch.tensor([v], dtype=torch.bfloat16)})
    out = merge(tmp_path, tmp_path, method="linear")
    assert sum(Fraction(v) for v in values) / 3 == Fraction(-0.013214111328125)
    assert out["w"].item() == -0.01318359375


def test_uniform_merge_equals_the_exact_mean_everywhere(inputs, tmp_path):
    root, models = inputs
    out = merge(root, tmp_path, method="linear")  # default weights: 1/3 each, i.e. the plain mean
    for name in BIG_SHAPES:
        exact = sum(x.double() for x in floats(models, name)) / 3
        expected = round_to_bf16(exact)
        assert torch.equal(out[name], expected), name
        ties = (exact * 3 == sum(x.double() for x in floats(models, name))) & (expected.double() != exact)
        assert ties.any()  # not vacuous: some elements round a real result


def test_linear_output_dtype_is_configurable(inputs, tmp_path):
    root, models = inputs
    out = merge(root, tmp_path, method="linear", weights=[1, 1, 1], parameters={"normalize": False}, output={"dtype": "float32"})
    assert out["embed.weight"].dtype == torch.float32
    exact = sum(x.double() for x in floats(models, "embed.weight"))  # exact in float64: one rounding to fp32
    assert torch.equal(out["embed.weight"], exact.float())
    assert out["buf.ids"].dtype == torch.int64


def test_task_arithmetic_with_dyadic_parameters_is_exact(inputs, tmp_path):
    root, models = inputs
    out = merge(root, tmp_path, method="task_arithmetic", base_model="m1", weights=[0.75, 0.25], parameters={"lambda": 0.5})
    for name in BIG_SHAPES:
        base, a, b = (models[i][name].double() for i in (1, 0, 2))
        assert torch.equal(out[name], round_to_bf16(base + ((a - base) * 0.75 + (b - base) * 0.25) * 0.5)), name


def test_task_arithmetic_is_the_exact_formula_rounded_once(inputs, tmp_path):
    root, models = inputs
    out = merge(root, tmp_path, method="task_arithmetic", base_model="m1", weights=[0.7, 0.4], parameters={"lambda": 0.8})
    lam, w = Fraction(0.8), [Fraction(0.7), Fraction(0.4)]
    for name in BIG_SHAPES:
        flat = [models[i][name].flatten() for i in (1, 0, 2)]
        for j in torch.randperm(flat[0].numel(), generator=torch.Generator().manual_seed(0))[:1500].tolist():
            base, a, b = (Fraction(x[j].item()) for x in flat)
            expected = exact_bf16(base + lam * (w[0] * (a - base) + w[1] * (b - base)))
            assert out[name].flatten()[j].item() == expected, (name, j)


def disjoint_mean(deltas, weights):
    """TIES's elect + disjoint merge written out on whole tensors."""
    weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
    sign = torch.sign(weighted_sum(weighted, [1.0] * len(weighted)))
    agree = [(torch.sign(d) == sign) & (d != 0) for d in deltas]
    numerator = sum(torch.where(a, wd, 0.0) for a, wd in zip(agree, weighted, strict=True))
    denominator = sum(torch.where(a, w, 0.0) for a, w in zip(agree, weights, strict=True))
    return torch.where(denominator != 0, numerator / denominator, 0.0)


def test_ties_keeps_the_top_density_of_each_task_vector(inputs, tmp_path):
    root, models = inputs
    out = merge(root, tmp_path, method="ties", base_model="m0", weights=[0.6, 0.9], parameters={"density": 0.3, "lambda": 1.5})
    for name in BIG_SHAPES:
        base = models[0][name].float()
        trimmed = []
        for x in (models[1][name].float(), models[2][name].float()):
            delta = x - base
            n = delta.numel()
            threshold = delta.abs().flatten().kthvalue(n - round(0.3 * n) + 1).values
            trimmed.append(torch.where(delta.abs() >= threshold, delta, 0.0))
        kept = (trimmed[0] != 0).float().mean().item()
        assert abs(kept - 0.3) < 0.01
        expected = base + disjoint_mean(trimmed, [0.6, 0.9]) * 1.5
        assert torch.equal(out[name], expected.to(torch.bfloat16)), name


def whole_mask(name: str, model: int, numel: int, density: float, seed: int) -> torch.Tensor:
    blocks = [Block(name, k, min(BLOCK, numel - k * BLOCK), seed) for k in range(math.ceil(numel / BLOCK))]
    return torch.cat([dare_keep(b, model, density) for b in blocks])


def test_ties_keeping_nothing_of_a_small_tensor_gives_its_base(inputs, tmp_path):
    """density * numel rounds to 0 for the 1000-element norm: nothing of its task vectors is kept, its
    statistic reads one block of its two planned passes, and the merge steps through the rest (else
    the next chunk it asks the reader for is out of the planned order)."""
    root, models = inputs
    out = merge(root, tmp_path, method="ties", base_model="m0", weights=[0.6, 0.9], parameters={"density": 0.0004})
    assert torch.equal(out["norm.weight"], models[0]["norm.weight"])
    assert not torch.equal(out["layer.weight"], models[0]["layer.weight"])


def test_every_method_declares_the_passes_its_statistic_makes():
    for name, method in METHODS.items():
        assert method.spec is SPECS[name]
        assert (method.prepare is None) == (method.spec.reads == 1), name
    assert METHODS.keys() == SPECS.keys()


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare(inputs, tmp_path, method):
    """mergekit's DARE: each task vector masked at random, rescaled to its L1 norm (the fp32 ratio of
    its norms before and after), weighted; summed (dare_linear) or summed where its sign agrees with
    the weighted sum's (dare_ties), not normalized by default."""
    root, models = inputs
    out = merge(root, tmp_path, method=method, base_model="m2", weights=[0.5, -0.8], parameters={"density": 0.4}, seed=7)
    for name in BIG_SHAPES:
        base = models[2][name].float()
        weighted = []
        for position, (i, w) in enumerate(((0, 0.5), (1, -0.8)), start=1):  # the base is input 0, then the others
            mask = whole_mask(name, position, base.numel(), 0.4, seed=7).reshape(base.shape)
            assert abs(mask.float().mean().item() - 0.4) < 5 * math.sqrt(0.24 / mask.numel())  # 5 sigma
            delta = models[i][name].float() - base
            masked = delta * mask.float()
            ratio = torch.tensor(delta.abs().double().sum().item(), dtype=torch.float32) / torch.tensor(
                masked.abs().double().sum().item(), dtype=torch.float32)
            weighted.append(masked * ratio * w)
        if method == "dare_linear":
            mixed = weighted[0] + weighted[1]
        else:
            majority = torch.where(weighted[0] + weighted[1] >= 0, 1.0, -1.0)
            mixed = sum(torch.where(torch.sign(wd) == majority, wd, 0.0) for wd in weighted)
        assert torch.equal(out[name], (base + mixed).to(torch.bfloat16)), name


def test_dare_does_not_depend_on_chunking(inputs, tmp_path):
    root, _ = inputs
    settings = {"method": "dare_ties", "base_model": "m0", "parameters": {"density": 0.5}}
    small = merge(root, tmp_path / "a", blocks=1, **settings)
    large = merge(root, tmp_path / "b", blocks=5, **settings)
    assert all(torch.equal(small[n], large[n]) for n in small)
    assert not torch.equal(small["embed.weight"], merge(root, tmp_path / "c", seed=1, **settings)["embed.weight"])


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a, b = a.float(), b.float()
    cos = (torch.dot(a.flatten().double(), b.flatten().double()) / (a.double().norm() * b.double().norm())).item()
    if abs(cos) > 0.9995:
        c0, c1 = 1 - t, t
    else:
        omega = math.acos(cos)
        c0, c1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return a * c0 + b * c1


def test_slerp_with_a_per_tensor_t(inputs, tmp_path):
    root, models = inputs
    out = merge(
        root, tmp_path, count=2, method="slerp", parameters={"t": 0.3},
        overrides=[{"pattern": "layer.*", "parameters": {"t": 0.9}}],
    )
    for name in BIG_SHAPES:
        t = 0.9 if name.startswith("layer.") else 0.3
        assert torch.equal(out[name], slerp_reference(models[0][name], models[1][name], t).to(torch.bfloat16)), name


def test_slerp_of_parallel_tensors_falls_back_to_lerp(tmp_path):
    a = random_tensors(0, {"w": (300, 1000)})["w"]
    raw_checkpoint(tmp_path / "m0", {"w": a})
    raw_checkpoint(tmp_path / "m1", {"w": (a.float() * 2).to(torch.bfloat16)})
    out = merge(tmp_path, tmp_path, count=2, method="slerp", parameters={"t": 0.25})
    expected = a.float() * 0.75 + (a.float() * 2).to(torch.bfloat16).float() * 0.25
    assert torch.equal(out["w"], expected.to(torch.bfloat16))


def test_overrides_change_weights_for_matching_tensors_only(inputs, tmp_path):
    root, models = inputs
    out = merge(root, tmp_path, method="linear", weights=[1, 1, 1], overrides=[{"pattern": "embed.*", "weights": [1, 0, 0]}])
    assert torch.equal(out["embed.weight"], models[0]["embed.weight"])
    expected = round_to_bf16(sum(x.double() for x in floats(models, "layer.weight")) / 3)
    assert torch.equal(out["layer.weight"], expected)


@pytest.fixture(params=["compiled", "torch"])
def histograms(request, monkeypatch):
    """merge/methods/fast_pass.c's magnitude histograms, or the torch ops used where no C compiler is."""
    from merge.methods import fast_kernel

    if request.param == "torch":
        monkeypatch.setattr(fast_kernel, "library", lambda: None)
    elif fast_kernel.library() is None:
        pytest.skip("no C compiler here: the compiled histograms could not be built")


def test_kth_largest_abs_is_exact_with_ties_and_any_blocking(histograms):
    generator = torch.Generator().manual_seed(0)
    series = [torch.randint(-50, 50, (10_000,), generator=generator).float() / 7, torch.randn(10_000, generator=generator)]
    cuts = [0, 1, 999, 5000, 5001, 10_000]
    blocks = lambda: ([s[a:b] for s in series] for a, b in zip(cuts, cuts[1:], strict=False))  # noqa: E731
    for k in (1, 2, 137, 5000, 10_000):
        expected = [s.abs().kthvalue(len(s) - k + 1).values.item() for s in series]
        assert kth_largest_abs(blocks, k) == expected


def test_kth_largest_abs_of_large_blocks_with_signed_zeros_infinities_and_subnormals(histograms):
    """Blocks beyond 65536 elements (the compiled count's interleaved histograms), ranks counted among
    the nonzero elements as SCE counts them, -0.0 a zero."""
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(200_003, generator=generator) * torch.rand(200_003, generator=generator) ** 4
    values[::7] = 0.0
    values[1::7] = -0.0
    values[2::1009] = -math.inf
    values[3::997] = 1e-42  # subnormal
    nonzero = int((values != 0).sum())
    blocks = lambda: ([values[a:a + 70_000]] for a in range(0, len(values), 70_000))  # noqa: E731
    for share in (0.001, 0.3, 1.0):
        (found,) = kth_largest_abs(blocks, lambda count, share=share: int(count * share))
        rank = int(nonzero * share)
        assert found == values.abs().kthvalue(len(values) - rank + 1).values.item()


def test_a_difference_counts_as_the_task_vector_it_stands_for(histograms):
    """kth_largest_abs of Difference(x, base) blocks (counted without making x - base) equals it of the
    materialised differences, infinities (inf - inf: NaN) included."""
    from merge.methods.magnitude import Difference

    generator = torch.Generator().manual_seed(2)
    base, x = torch.randn(2, 150_001, generator=generator) * 0.02
    x[::9] = base[::9]  # zero task-vector elements
    base[1::1001], x[1::1001] = torch.inf, torch.inf
    x[2::997] = -torch.inf
    cuts = list(range(0, len(x), 66_000)) + [len(x)]
    pairs = lambda: ([Difference(x[a:b], base[a:b])] for a, b in zip(cuts, cuts[1:], strict=False))  # noqa: E731
    made = lambda: ([x[a:b] - base[a:b]] for a, b in zip(cuts, cuts[1:], strict=False))  # noqa: E731
    for k in (1, 40, 75_000, lambda nonzero: nonzero // 3):
        assert repr(kth_largest_abs(pairs, k)) == repr(kth_largest_abs(made, k))  # repr: NaN equals NaN


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_blocks_as_stored_count_as_their_fp32_values(histograms, stored):
    """A statistic pass gets each input as stored: bfloat16 counted as it is by the compiled histograms
    (float16, and everything without them, widened first), the same thresholds as of the fp32 values."""
    from merge.methods.magnitude import Difference

    generator = torch.Generator().manual_seed(3)
    base, x = (torch.randn(2, 150_001, generator=generator) * 0.02).to(stored)
    x[::9] = base[::9]
    x[1::1001] = torch.inf
    cuts = list(range(0, len(x), 66_000)) + [len(x)]
    for pair in ((x, base), (x.float(), base.float())):
        blocks = lambda pair=pair: ([Difference(*(t[a:b] for t in pair)), pair[0][a:b]]  # noqa: E731
                                    for a, b in zip(cuts, cuts[1:], strict=False))
        found = [kth_largest_abs(blocks, k) for k in (1, 40, 75_000)]
        if pair[0].dtype == stored:
            as_stored = found
    assert repr(as_stored) == repr(found)


@pytest.mark.parametrize("models", [1, 2, 3, 5])
def test_sce_variance_is_torch_var_bit_for_bit(models):
    """SCE's variance across task vectors is mergekit's torch.var(stack, dim=0, unbiased=False) to the
    bit, infinities and NaNs included, computed by whole-block ops instead of torch's per-element loop."""
    from merge.methods.sparse import _variance

    generator = torch.Generator().manual_seed(models)
    tvs = [torch.randn(100_000, generator=generator) * scale for scale in torch.rand(models, generator=generator)]
    tvs[0][3], tvs[-1][4] = math.inf, math.nan
    expected = torch.var(torch.stack(tvs), dim=0, unbiased=False)
    assert torch.equal(_variance(tvs).view(torch.int32), expected.view(torch.int32))


def test_a_block_repeated_in_a_pass_is_counted_once_for_all_its_ranks(histograms, monkeypatch):
    """Breadcrumbs asks two ranks of each task vector by listing its block twice: the same thresholds as
    copies would give (ranks in one high bin and in two), from one count of each pass per block."""
    from merge.methods import magnitude

    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 100_000, generator=generator)
    cuts = [0, 30_000, 100_000]
    repeated = lambda: ([p, q, p, q] for p, q in ((a[i:j], b[i:j]) for i, j in zip(cuts, cuts[1:], strict=False)))  # noqa: E731
    copied = lambda: ([a[i:j], b[i:j], a[i:j].clone(), b[i:j].clone()] for i, j in zip(cuts, cuts[1:], strict=False))  # noqa: E731
    counts = {"high": 0, "low": 0}
    originals = {"high": magnitude._count_high, "low": magnitude._count_low}
    for kind in counts:
        def counted(*args, kind=kind):
            counts[kind] += 1
            return originals[kind](*args)

        monkeypatch.setattr(magnitude, f"_count_{kind}", counted)
    for ranks in ([10, 20, 11, 21], [10, 5000, 60_000, 7]):
        counts.update(high=0, low=0)
        assert kth_largest_abs(repeated, ranks) == kth_largest_abs(copied, ranks)
        # copied: 4 series x 2 blocks per pass; repeated: half of them in the high pass.
        assert counts["high"] == 8 + 4
        expected = [a.abs().kthvalue(len(a) - r + 1).values.item() for r in ranks[::2]]
        assert kth_largest_abs(repeated, ranks)[::2] == expected
