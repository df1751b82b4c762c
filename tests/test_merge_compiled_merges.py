"""fast_pass.c's last pass of the sign-electing merges (registry.ties, sparse.mix) against the torch code it
replaces, bit for bit, on values chosen to be hard: signed zeros, infinities, NaN, ties in magnitude,
negative and zero weights, 1 to MAX_MODELS task vectors.

Lengths are multiples of 64: torch's sum over a stack adds in model order in its vector loop, which the
compiled pass does for every element, but in the scalar tail (the last n mod 64 elements here) it
adds 5 or more rows in another order, so there the two may differ in the last bit.
"""

from __future__ import annotations

import struct

import pytest
import torch

from merge.methods import fast_kernel, sparse
from merge.methods.blocks import Block
from merge.methods.registry import ties
from merge.methods.specs import SPECS

pytestmark = pytest.mark.skipif(fast_kernel.library() is None, reason="no C compiler here: nothing compiled to compare")


def hard(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=generator) * 0.02
    values[::5] = torch.randint(-3, 4, (len(values[::5]),), generator=generator).float() * 0.01  # ties
    values[1::11] = 0.0
    values[2::13] = -0.0
    values[3::101] = torch.inf
    values[4::103] = -torch.inf
    values[5::107] = torch.nan
    values[6::17] = 1e-40  # subnormal
    return values


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def torch_only(monkeypatch, call, *args):
    with monkeypatch.context() as m:
        m.setattr(fast_kernel, "library", lambda: None)
        return call(*args)


N = 64 * 47
WEIGHTS = [0.7, -0.3, 0.0, 1.3, 0.25, 2.0, -1.1, 0.5]


@pytest.mark.parametrize("models", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_ties_is_the_torch_code_to_the_bit(models, scale, monkeypatch):
    xs = [hard(N, seed) for seed in range(models + 1)]
    thresholds = [0.01, 0.0, float("inf"), 0.02, 0.005, 0.03, 0.0, 0.015][:models]
    params = SPECS["ties"].params.model_validate({"density": 0.5, "scale": scale})
    block = Block("t", 0, N, seed=0)
    compiled = ties(xs, WEIGHTS[:models], params, thresholds, block)
    reference = torch_only(monkeypatch, lambda: ties(xs, WEIGHTS[:models], params, thresholds, block))
    assert same_bits(compiled, reference)


@pytest.mark.parametrize("models", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("ties_, normalize, scale", [(True, True, 1.0), (True, False, 0.5), (False, True, 1.0),
                                                     (False, False, 1.7)])
def test_mix_is_the_torch_code_to_the_bit(models, ties_, normalize, scale, monkeypatch):
    base = hard(N, 100)
    tvs = [hard(N, seed) for seed in range(models)]
    for weights in (WEIGHTS[:models], [1e-9] * models):  # the second: a weight sum under 1e-8
        compiled = sparse.mix(base, tvs, weights, ties_, normalize, scale)
        reference = torch_only(monkeypatch, lambda w=weights: sparse.mix(base, tvs, w, ties_, normalize, scale))
        assert same_bits(compiled, reference)


def test_more_models_than_the_compiled_pass_takes_run_in_torch():
    xs = [hard(10, seed) for seed in range(fast_kernel.MAX_MODELS + 2)]
    assert fast_kernel.ties_merge(xs, [0.0] * (len(xs) - 1), [1.0] * (len(xs) - 1), 1.0) is None
    assert fast_kernel.mix_merge(xs[0], xs[1:], [1.0] * (len(xs) - 1), True, True, 1.0, 1.0) is None


@pytest.mark.parametrize("key", [0, 3, 2**63 + 11, 2**64 - 1])
def test_the_seeded_draws_are_the_torch_code_to_the_bit(key, monkeypatch):
    from merge.methods.blocks import uniform_draws

    compiled = fast_kernel.uniform_draws(key, 100_003)
    assert same_bits(compiled, uniform_draws(key, 100_003))
    # Uniform on [0, 1): mean and share below 0.3 within 5 standard errors of a sample this size.
    assert compiled.min() >= 0.0 and compiled.max() < 1.0
    assert abs(compiled.mean().item() - 0.5) < 5 * (1 / 12 / 100_003) ** 0.5
    assert abs((compiled < 0.3).float().mean().item() - 0.3) < 5 * (0.21 / 100_003) ** 0.5


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density", [0.3, 0.4, 0.9])
@pytest.mark.parametrize("rescale", [True, False])
def test_masked_task_vectors_are_the_torch_code_to_the_bit(method, density, rescale, monkeypatch):
    """DARE's and Breadcrumbs' statistic (thresholds, L1 ratios) and merge, compiled against torch: the
    same draws or windows, masks, ratios and output, with infinities and NaN among the inputs."""
    from merge.methods.registry import METHODS

    def blocks():  # two blocks, as a tensor of 2 * N elements is read
        for index in range(2):
            yield Block("w", index, N, seed=5), [hard(N, 10 * index + s) for s in range(4)]

    spec, method_ = SPECS[method], METHODS[method]
    params = spec.params.model_validate({"density": density, "rescale": rescale,
                                         **({"gamma": 0.05} if method.startswith("breadcrumbs") else {})})
    weights = [0.7, -0.3, 1.3]
    finite = lambda: ([b, [x.nan_to_num(0.0, 0.0, 0.0) for x in xs]] for b, xs in blocks())  # noqa: E731
    for source in (blocks, finite):
        stats = method_.prepare(source, 2 * N, params, weights)
        reference = torch_only(monkeypatch, method_.prepare, source, 2 * N, params, weights)
        if isinstance(stats, sparse.Sparsity):  # Breadcrumbs: its window, then its ratios
            assert (stats.lower, stats.upper) == (reference.lower, reference.upper)
            stats_ratios, reference_ratios = stats.rescale, reference.rescale
        else:
            stats_ratios, reference_ratios = stats or [], reference or []
        assert any(r is not None for r in stats_ratios) == rescale
        for ours, theirs in zip(stats_ratios, reference_ratios, strict=True):
            assert (ours is None and theirs is None) or same_bits(ours, theirs) or (ours.isnan() and theirs.isnan())
        for block, xs in source():
            merged = method_.combine(xs, weights, params, stats, block)
            reference = torch_only(monkeypatch, method_.combine, xs, weights, params, stats, block)
            # An infinite input makes a rescale ratio NaN: then NaN everywhere, its sign bit the ops' choice.
            nan = merged.isnan()
            assert torch.equal(nan, reference.isnan()) and same_bits(merged[~nan], reference[~nan])


@pytest.mark.parametrize("finite", [False, True])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"])
def test_sparse_methods_read_bfloat16_as_stored(method, finite, monkeypatch):
    """DARE, Breadcrumbs and DELLA read bfloat16 blocks as stored (masked_l1, della_keep, sparse_merge;
    MethodSpec.stored_blocks): their thresholds, L1 ratios, DELLA's masks and the merge equal those of the
    same values widened to fp32 first, compiled and torch, with infinities and NaN among the inputs or not."""
    from merge.methods.registry import METHODS

    method_ = METHODS[method]
    assert method_.spec.stored_blocks
    shape = (N // 64, 64)
    values = [[hard(N, 10 * index + s).to(torch.bfloat16) for s in range(3)] for index in range(2)]
    values = [[x.nan_to_num(0.0, 0.0, 0.0) if finite else x for x in xs] for xs in values]
    stored = lambda: ((Block("w", i, N, seed=5, shape=shape), xs) for i, xs in enumerate(values))  # noqa: E731
    widened = lambda: ((b, [x.float() for x in xs]) for b, xs in stored())  # noqa: E731
    params = method_.spec.params.model_validate({"density": 0.4, "rescale": True,
                                                 **({"gamma": 0.05} if method.startswith("breadcrumbs") else {})})
    weights = [0.7, 1.3]

    def summary(stats):
        ratios = stats.rescale if isinstance(stats, sparse.Sparsity) else getattr(stats, "ratios", stats)
        window = (stats.lower, stats.upper) if isinstance(stats, sparse.Sparsity) else None
        masks = {k: v.tolist() for k, v in getattr(stats, "masks", {}).items()}
        return window, [None if r is None else r.view(torch.int32).item() if not r.isnan() else "nan" for r in ratios], masks

    ours = summary(method_.prepare(stored, 2 * N, params, weights))
    assert any(r is not None for r in ours[1]) and finite == ("nan" not in ours[1])
    assert ours == summary(method_.prepare(widened, 2 * N, params, weights))
    assert ours[:2] == summary(torch_only(monkeypatch, method_.prepare, stored, 2 * N, params, weights))[:2]

    def statistic():  # DELLA's merge takes the masks its statistic kept: each merge gets its own
        return method_.prepare(stored, 2 * N, params, weights)

    for block, xs in stored():
        merged = method_.combine(xs, weights, params, statistic(), block)
        assert merged.dtype == torch.float32 and merged.isfinite().all() == finite
        for other in (method_.combine([x.float() for x in xs], weights, params, statistic(), block),
                      torch_only(monkeypatch, method_.combine, xs, weights, params, statistic(), block)):
            nan = merged.isnan()
            assert torch.equal(nan, other.isnan()) and same_bits(merged[~nan], other[~nan])


@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.1])
@pytest.mark.parametrize("models", [1, 2, 3, 4, 5])
def test_sce_is_the_torch_code_to_the_bit(select_topk, models, monkeypatch):
    """SCE's variance threshold, shares and merge, compiled against torch. The shares' fp64 sums of
    squares add in another order: equal to fp32 rounding, not asserted to the bit; the merge with the
    same statistic is."""
    from merge.methods.registry import METHODS

    def blocks():
        for index in range(2):
            yield Block("w", index, N, seed=0), [hard(N, 20 * index + s).nan_to_num(0.0, 0.0, 0.0) for s in range(models + 1)]

    method, params = METHODS["sce"], SPECS["sce"].params.model_validate({"select_topk": select_topk})
    stats = method.prepare(blocks, 2 * N, params, [1.0] * models)
    reference = torch_only(monkeypatch, method.prepare, blocks, 2 * N, params, [1.0] * models)
    assert stats.threshold == reference.threshold and (stats.threshold is None) == (select_topk == 1.0)
    torch.testing.assert_close(stats.weights, reference.weights, rtol=2**-23, atol=0)
    for block, xs in blocks():
        merged = method.combine(xs, [1.0] * models, params, stats, block)
        assert same_bits(merged, torch_only(monkeypatch, method.combine, xs, [1.0] * models, params, stats, block))
    hard_xs = [hard(N, s) for s in range(models + 1)]  # infinities and NaN: the variance to the bit
    from merge.methods.sparse import _variance

    compiled = fast_kernel.sce_variance(hard_xs)
    expected = _variance([x - hard_xs[0] for x in hard_xs[1:]])
    nan = compiled.isnan()
    assert torch.equal(nan, expected.isnan()) and same_bits(compiled[~nan], expected[~nan])
    block = Block("w", 0, N, seed=0)
    merged = method.combine(hard_xs, [1.0] * models, params, stats, block)
    expected = torch_only(monkeypatch, method.combine, hard_xs, [1.0] * models, params, stats, block)
    nan = merged.isnan()
    assert torch.equal(nan, expected.isnan()) and same_bits(merged[~nan], expected[~nan])


@pytest.mark.parametrize("models", [2, 3])
def test_sce_reads_bfloat16_as_stored(models, monkeypatch):
    """The SCE passes read bfloat16 blocks as stored (its statistic's blocks, and its merge's:
    MethodSpec.stored_blocks): variance, sums of squares, statistic and merge equal the compiled and the
    torch code's on the same values widened to fp32, to the bit (NaN where theirs is)."""
    from merge.methods.registry import METHODS

    stored = [hard(N, 30 + s).bfloat16() for s in range(models + 1)]
    widened = [x.float() for x in stored]
    variance, expected = fast_kernel.sce_variance(stored), fast_kernel.sce_variance(widened)
    nan = expected.isnan()
    assert variance.dtype == torch.float32 and torch.equal(variance.isnan(), nan) and same_bits(variance[~nan], expected[~nan])
    finite = [x.nan_to_num(0.0, 0.0, 0.0) for x in stored]
    assert fast_kernel.sce_squares(finite, 1e-4) == fast_kernel.sce_squares([x.float() for x in finite], 1e-4)

    def blocks(xs):
        return lambda: iter([(Block("w", 0, N, seed=0), xs)])

    method, params = METHODS["sce"], SPECS["sce"].params.model_validate({"select_topk": 0.5})
    assert method.spec.stored_blocks
    stats = method.prepare(blocks(finite), N, params, [1.0] * models)
    reference = torch_only(monkeypatch, method.prepare, blocks([x.float() for x in finite]), N, params, [1.0] * models)
    assert stats.threshold == reference.threshold
    torch.testing.assert_close(stats.weights, reference.weights, rtol=2**-23, atol=0)
    block = Block("w", 0, N, seed=0)
    merged = method.combine(stored, [1.0] * models, params, stats, block)
    for expected in (method.combine(widened, [1.0] * models, params, stats, block),
                     torch_only(monkeypatch, method.combine, stored, [1.0] * models, params, stats, block)):
        nan = expected.isnan()
        assert torch.equal(merged.isnan(), nan) and same_bits(merged[~nan], expected[~nan])


@pytest.mark.parametrize(("rows", "group", "density", "epsilon"), [(40, 2048, 0.5, 0.15), (64, 47, 0.4, 0.3), (4, 3008, 0.6, 0.1), (9, 1, 0.5, 0.2)])
def test_della_keep_mask_is_the_torch_ranks_draws_to_the_bit(rows, group, density, epsilon, monkeypatch):
    """fast_pass.c della_keep decides most elements from their magnitude bin's rank range and ranks only
    the rest: against della.py's torch mask (argsort ranks, fp32 chances, the block's draws). Rows of
    Gaussian task vectors (a few elements ranked by counting within their bin), of hard values, a row of
    one value (one bin of every element: the whole row radix-ranked), a row of tiny magnitudes at the
    bins' edge, rows of magnitudes over 24 octaves (a crowded first bin ranked alone) and rows of one
    element (their chance is NaN: nothing kept)."""
    from merge.methods.blocks import block_key, block_uniform
    from merge.methods.della import keep_chances

    n = rows * group
    generator = torch.Generator().manual_seed(group)
    base = torch.randn(n, generator=generator).to(torch.bfloat16).float()
    x = base + torch.randn(n, generator=generator).to(torch.bfloat16).float() * 0.01
    x[: 2 * group] = base[: 2 * group] + hard(2 * group, 3)
    x[2 * group : 3 * group] = base[2 * group : 3 * group] + 0.25
    # Magnitudes up to 2^-119, whose key 2^26 is the first that the bins' window starts above zero for.
    base[3 * group : 4 * group] = 0.0
    x[3 * group : 4 * group] = torch.rand(group, generator=generator) * 2.0**-119
    x[4 * group - 1] = 2.0**-119
    if rows >= 7:  # magnitudes over 24 octaves: a third below the bins' 8, all in the first bin, radix-ranked alone
        spread = 2.0 ** -(torch.rand(3 * group, generator=generator) * 24) * torch.randn(3 * group, generator=generator).sign()
        x[4 * group : 7 * group] = base[4 * group : 7 * group] + spread
    shape = (rows, group)
    block = Block("w", 2, n, seed=5, shape=shape)
    expected = (block_uniform(block, 1) < torch_only(monkeypatch, keep_chances, x - base, shape, density, epsilon)).float()
    packed, norms = fast_kernel.della_keep(x, base, group, block_key(block, 1), density, epsilon, norms=True)
    unpacked = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()  # element i: bit i % 8
    assert packed.numel() == -(-n // 8) and not unpacked[n:].any()  # the last byte's spare bits are 0
    keep = unpacked[:n].float()
    assert same_bits(keep, expected)
    assert group > 1 or not keep.any()
    assert 0 < expected.mean() < 1 or group == 1
    # The norms from the same pass: masked_l1's of that mask, to the bit (its lanes, in its order).
    assert struct.pack("2d", *norms) == struct.pack("2d", *fast_kernel.masked_l1(x, base, fast_kernel.Mask.given_by(packed)))
    # bfloat16 inputs, read as stored: the mask and norms of their fp32 values.
    x16, base16 = x.to(torch.bfloat16), base.to(torch.bfloat16)
    stored = fast_kernel.della_keep(x16, base16, group, block_key(block, 1), density, epsilon, norms=True)
    widened = fast_kernel.della_keep(x16.float(), base16.float(), group, block_key(block, 1), density, epsilon, norms=True)
    assert torch.equal(stored[0], widened[0]) and struct.pack("2d", *stored[1]) == struct.pack("2d", *widened[1])


@pytest.mark.parametrize("models", [2, 3, 5, 8])
@pytest.mark.parametrize("base", [False, True])
def test_multislerp_is_the_torch_code_to_the_bit(models, base, monkeypatch):
    """Multi-SLERP's elementwise step compiled against its torch code, with the statistic of the same
    inputs: on finite values (the statistic of inputs with infinities is NaN), then on hard values with
    that statistic; and the linear fallback of two vectors whose weighted mean vanishes."""
    from merge.methods.registry import METHODS
    from merge.methods.spherical import multislerp_statistic

    inputs = models + int(base)
    weights = [abs(w) + 0.1 for w in WEIGHTS[:models]]
    params = SPECS["multislerp"].params.model_validate({})

    def blocks():
        for index in range(2):
            yield Block("w", index, N, seed=0), [hard(N, 30 * index + s).nan_to_num(0.0, 0.0, 0.0) for s in range(inputs)]

    stats = multislerp_statistic(blocks, 2 * N, params, weights)
    assert stats.mean_norm is not None
    method = METHODS["multislerp"]
    for block, xs in [*blocks(), (Block("w", 0, N, seed=0), [hard(N, 50 + s) for s in range(inputs)])]:
        merged = method.combine(xs, weights, params, stats, block)
        expected = torch_only(monkeypatch, method.combine, xs, weights, params, stats, block)
        nan = merged.isnan()
        assert torch.equal(nan, expected.isnan()) and same_bits(merged[~nan], expected[~nan])
    if models == 2:  # antipodal inputs, equal weights: the weighted mean vanishes
        x = hard(N, 7).nan_to_num(0.0, 0.0, 0.0)
        xs = [x, -x] if not base else [torch.zeros(N), x, -x]
        antipodal = multislerp_statistic(lambda: iter([(Block("w", 0, N, seed=0), xs)]), N, params, [0.5, 0.5])
        assert antipodal.mean_norm is None
        block = Block("w", 0, N, seed=0)
        merged = method.combine(xs, [0.5, 0.5], params, antipodal, block)
        assert same_bits(merged, torch_only(monkeypatch, method.combine, xs, [0.5, 0.5], params, antipodal, block))


@pytest.mark.parametrize("models", [1, 2, 3, 8])
@pytest.mark.parametrize("base", [False, True])
def test_the_gram_matrix_is_torchs_fp64_dots_to_their_accuracy(models, base, monkeypatch):
    """The compiled Gram matrix adds each pair's exact fp64 products in another order than torch.dot:
    the same to fp64 rounding (relative 1e-12, where a bf16 input's fp32 ulp is 4e-3), symmetric, and on
    a short last block (N + 5 elements) as on whole ones; of bfloat16 blocks read as stored, that of their
    fp32 values to the bit."""
    from merge.methods.spherical import gram

    def blocks():
        for index in range(2):
            yield Block("w", index, N + 5 * index, seed=0), [hard(N + 5 * index, 40 * index + s).nan_to_num(0.0, 0.0, 0.0)
                                                             for s in range(models + int(base))]

    compiled = gram(blocks, base)
    reference = torch_only(monkeypatch, gram, blocks, base)
    assert len(compiled) == models and all(compiled[i][j] == compiled[j][i] for i in range(models) for j in range(models))
    torch.testing.assert_close(torch.tensor(compiled, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64),
                               rtol=1e-12, atol=0)

    def stored():  # bfloat16 blocks, read as stored: the Gram matrix of their fp32 values, to the bit
        for block, xs in blocks():
            yield block, [x.bfloat16() for x in xs]

    def widened():
        for block, xs in stored():
            yield block, [x.float() for x in xs]

    assert gram(stored, base) == gram(widened, base)
    torch.testing.assert_close(torch.tensor(torch_only(monkeypatch, gram, stored, base), dtype=torch.float64),
                               torch.tensor(gram(widened, base), dtype=torch.float64), rtol=1e-12, atol=0)
