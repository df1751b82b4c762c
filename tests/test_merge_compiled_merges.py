"""fast_pass.c's last pass of the sign-electing merges (registry.ties, sparse.mix) against the torch code it
replaces, bit for bit, on values chosen to be hard: signed zeros, infinities, NaN, ties in magnitude,
negative and zero weights, 1 to MAX_MODELS task vectors.

Lengths are multiples of 64: torch's sum over a stack adds in model order in its vector loop, which the
compiled pass does for every element, but in the scalar tail (the last n mod 64 elements here) it
adds 5 or more rows in another order, so there the two may differ in the last bit.
"""

from __future__ import annotations

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


def torch_only(monkeypatch, call):
    with monkeypatch.context() as m:
        m.setattr(fast_kernel, "library", lambda: None)
        return call()


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
