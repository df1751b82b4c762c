"""The mergekit-defined methods against mergekit 0.1.5's own outputs on the same tiny inputs
(tests/fixtures/mergekit/, made by make_fixtures.py there, with mergekit installed apart), and their
reproducibility and independence from chunking, workers and resumes.

Two levels of agreement, per method (BITWISE below):
- bitwise in fp32: every scalar the method uses comes from the inputs elementwise, and the elementwise
  ops are mergekit's own in its order;
- one bf16 ulp: the method needs whole-tensor fp32 scalars (norms, L1 sums, dot products, mean
  squares), which mergekit reduces in fp32 in torch's order and calm-dist in fp64 over blocks, rounded
  once to fp32 (so it does not depend on chunking). Those differ by an fp32 ulp or so, which moves the
  fp32 result by a few ulps of the tensor's largest element (asserted: at most 2**-21 of it) and the
  bf16 result, rounded once from fp32 by both, by at most one ulp.

Seeded methods (DARE, DELLA): the fixtures were made with mergekit's torch.bernoulli replaced by calm-dist's
per-block draws, so both merge with the same masks; the random stream itself is tested here for
reproducibility, not against mergekit's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_fixtures import BIG_SHAPES, budget_for_blocks, random_tensors, raw_checkpoint, read_merged
from safetensors.torch import load_file

from merge.job import run_merge
from merge.merge_config import validate_config
from merge.merge_errors import ConfigError
from merge.methods.sparse import breadcrumbs_window

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit"
CASES = json.loads((FIXTURES / "cases.json").read_text())
BITWISE = {"dare_ties_dense", "breadcrumbs", "della_norescale", "della_linear_norescale"}


def merge_case(case: dict, out: Path, dtype: str) -> dict[str, torch.Tensor]:
    names = ([case["base_model"]] if case["base_model"] else []) + case["models"]
    raw = {
        "method": case["method"], "models": [{"path": str(FIXTURES / "inputs" / n)} for n in names],
        "parameters": case["parameters"], "seed": case["seed"], "output": {"path": str(out), "dtype": dtype},
    }
    raw |= {"base_model": case["base_model"]} if case["base_model"] else {}
    raw |= {"weights": case["weights"]} if case["weights"] is not None else {}
    run_merge(validate_config(raw), show_progress=False, log=lambda _: None)
    return read_merged(out)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in representable values (same-sign floats: their bit patterns order like them)."""
    bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return (a.view(bits).long() - b.view(bits).long()).abs()


def test_every_fixture_case_is_listed_once():
    assert set(CASES) == {p.stem for p in FIXTURES.glob("*.safetensors")}
    assert set(CASES) >= BITWISE
    methods = {c["method"] for c in CASES.values()}
    assert methods == {"dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "sce", "model_stock",
                       "multislerp", "nuslerp", "karcher", "della", "della_linear"}


@pytest.mark.parametrize("name", sorted(BITWISE))
def test_matches_mergekit_bitwise(name, tmp_path):
    reference = load_file(str(FIXTURES / f"{name}.safetensors"))
    ours = merge_case(CASES[name], tmp_path / "out", "float32")
    assert ours.keys() == reference.keys()
    for tensor, expected in reference.items():
        assert torch.equal(ours[tensor], expected), tensor


@pytest.mark.parametrize("name", sorted(set(CASES) - BITWISE))
def test_matches_mergekit_within_one_bf16_ulp(name, tmp_path):
    reference = load_file(str(FIXTURES / f"{name}.safetensors"))
    ours32 = merge_case(CASES[name], tmp_path / "fp32", "float32")
    ours16 = merge_case(CASES[name], tmp_path / "bf16", "bfloat16")
    assert ours32.keys() == reference.keys() == ours16.keys()
    moved = 0
    for tensor, expected in reference.items():
        scale = expected.abs().max().item()
        assert (ours32[tensor] - expected).abs().max().item() <= scale * 2**-21, tensor
        distance = ulps(ours16[tensor], expected.to(torch.bfloat16))
        assert distance.max().item() <= 1, tensor
        moved += int(distance.sum())
    total = sum(t.numel() for t in reference.values())
    assert moved <= total // 100  # a rounding boundary is rarely this close


def test_dare_masks_matter(tmp_path):
    """Not vacuous: the fixtures' DARE masks drop elements (a dense merge of the same inputs differs)."""
    case = dict(CASES["dare_linear"], parameters={"density": 1.0})
    dense = merge_case(case, tmp_path / "dense", "float32")
    reference = load_file(str(FIXTURES / "dare_linear.safetensors"))
    assert all((dense[n] != reference[n]).float().mean() > 0.3 for n in reference)


def test_breadcrumbs_window_is_mergekits():
    # 100 elements, density 0.7, gamma 0.05: the 5 largest dropped, then the next 70 kept.
    assert breadcrumbs_window(100, 0.7, 0.05) == (5, 70)
    # density + gamma > 1: fewer outliers dropped, so that 90 are still kept.
    assert breadcrumbs_window(100, 0.9, 0.2) == (10, 90)
    assert breadcrumbs_window(7, 0.0, 0.1) == (0, 0)  # density 0 keeps nothing


# Streaming: chunking, workers, resumes.

NAMES = ["m0", "m1", "m2", "m3"]
# The int64 buffer is the costliest per element: 3 output copies and 2 of its one input, 8 bytes each.
PER_ELEMENT = 3 * 8 + 2 * 8
SETTINGS = {
    "dare_linear": {"base_model": "m0", "weights": [0.5, 0.8, 0.3], "parameters": {"density": 0.4}},
    "dare_ties": {"base_model": "m0", "weights": [1.0, 0.6, -0.4], "parameters": {"density": 0.5, "normalize": True}},
    "breadcrumbs_ties": {"base_model": "m0", "weights": [1.0, 0.6, 0.9], "parameters": {"density": 0.5, "rescale": True}},
    "sce": {"base_model": "m0", "parameters": {"select_topk": 0.3}},
    "model_stock": {"base_model": "m0"},
    "multislerp": {"weights": [0.2, 0.5, 0.1, 0.2]},
    "nuslerp": {"base_model": "m0", "models": 3, "weights": [0.4, 0.6]},
    "karcher": {},
}


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory):
    """Four bf16 checkpoints whose tensors span several blocks (m1-m3 near m0), plus an integer buffer."""
    root = tmp_path_factory.mktemp("inputs")
    base = random_tensors(0, BIG_SHAPES)
    for seed, name in enumerate(NAMES):
        tensors = base if seed == 0 else {
            n: (base[n].float() + 0.1 * t.float()).to(torch.bfloat16) for n, t in random_tensors(seed, BIG_SHAPES).items()
        }
        raw_checkpoint(root / name, {**tensors, "buf.ids": torch.arange(10, dtype=torch.int64)}, shards=2)
    return root


def run(root: Path, out: Path, method: str, blocks: int, workers: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    settings = dict(SETTINGS[method])
    count = settings.pop("models", 4)
    cfg = validate_config({
        "method": method, "models": [{"path": str(root / n)} for n in NAMES[:count]],
        # Small shards: several workers each get some.
        "output": {"path": str(out), "max_shard_size": 1_500_000},
        "memory_budget": budget_for_blocks(blocks, PER_ELEMENT, workers), "workers": workers, "seed": seed, **settings,
    })
    run_merge(cfg, show_progress=False, log=lambda _: None)
    return read_merged(out)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_results_do_not_depend_on_chunking(big_inputs, tmp_path, method):
    small = run(big_inputs, tmp_path / "small", method, blocks=1)
    large = run(big_inputs, tmp_path / "large", method, blocks=5)
    assert small.keys() == large.keys()
    assert all(torch.equal(small[n], large[n]) for n in small), method
    assert not torch.equal(small["embed.weight"], read_merged(big_inputs / "m0")["embed.weight"])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_from_its_seed_across_workers(big_inputs, tmp_path, method):
    one = run(big_inputs, tmp_path / "one", method, blocks=1)
    two = run(big_inputs, tmp_path / "two", method, blocks=2, workers=2)
    again = run(big_inputs, tmp_path / "again", method, blocks=1)
    other = run(big_inputs, tmp_path / "other", method, blocks=1, seed=1)
    assert all(torch.equal(one[n], two[n]) and torch.equal(one[n], again[n]) for n in one)
    assert not torch.equal(one["embed.weight"], other["embed.weight"])


def test_optional_base_and_model_counts_are_checked(tmp_path):
    def config(method: str, models: int, **extra):
        return {"method": method, "models": [{"path": str(tmp_path / f"m{i}")} for i in range(models)],
                "output": {"path": str(tmp_path / "out")}, **extra}

    validate_config(config("nuslerp", 2))
    validate_config(config("nuslerp", 3, base_model="m0"))
    with pytest.raises(ConfigError, match="models: nuslerp merges exactly 2 models besides the base, 1 given"):
        validate_config(config("nuslerp", 2, base_model="m0"))
    with pytest.raises(ConfigError, match="weights: 3 given, multislerp needs 2 \\(one per model other than the base\\)"):
        validate_config(config("multislerp", 3, base_model="m1", weights=[1, 1, 1]))
    with pytest.raises(ConfigError, match="base_model: karcher does not use a base model"):
        validate_config(config("karcher", 3, base_model="m0"))
    with pytest.raises(ConfigError, match="model_stock merges at least 3 models, 2 given"):
        validate_config(config("model_stock", 2, base_model="m0"))
    with pytest.raises(ConfigError, match="weights: sce takes no weights"):
        validate_config(config("sce", 3, base_model="m0", weights=[1, 1]))


def test_plan_counts_each_methods_block_arrays_and_statistic():
    from merge.methods.specs import BLOCK, HISTOGRAMS
    from merge.planning.memory import MergeSetup, merge_terms
    from merge.planning.plan import COMPUTE_THREADS

    setup = dict(inputs=4, input_bytes=1, output_bytes=1, largest_input_itemsize=2, output_itemsize=2,
                 chunk_elements=BLOCK, read_slots=2, read_bytes=2**30, largest_tensor=BLOCK, block=BLOCK, out_buffers=3,
                 worker_runtime=0, workers=1, max_shard_bytes=1)
    def terms(method: str) -> dict[str, tuple[int, str]]:
        return {t.name: (t.bytes, t.note) for t in merge_terms(MergeSetup(**setup, method=method)).terms}

    crumbs = terms("breadcrumbs")
    assert crumbs["fp32 block arithmetic"][0] == COMPUTE_THREADS * (4 * 4 + 2) * BLOCK * 4
    assert crumbs["whole-tensor statistic"][0] == 4 * 2 * HISTOGRAMS
    assert crumbs["whole-tensor statistic"][1].startswith("3 pass(es)")
    stock = terms("model_stock")
    assert stock["whole-tensor statistic"][0] == 0
    assert stock["whole-tensor statistic"][1].startswith("1 pass(es)")
    assert list(terms("linear")) == ["input read buffers", "output chunk buffers", "fp32 block arithmetic", "runtime allowance"]


def test_plan_counts_the_masks_della_holds_for_the_merge_pass():
    """DELLA holds a packed keep mask per task vector of the tensor being merged; no other method holds any."""
    from merge.io.safetensors_file import TensorInfo
    from merge.planning.plan import OutputTensor, largest_held_masks

    def tensor(method: str, numel: int, inputs: int = 4) -> OutputTensor:
        sources = tuple(TensorInfo(f"m{i}", "w", "BF16", (numel,), 0, 2 * numel) for i in range(inputs))
        return OutputTensor("w", "BF16", (numel,), sources, method, (1.0,) * (inputs - 1), {}, 0)

    assert largest_held_masks([tensor("della", 1001), tensor("della_linear", 800)]) == 126 * 3  # ceil(1001 / 8), 3 task vectors
    assert largest_held_masks([tensor("ties", 10**6), tensor("sce", 10**6), tensor("dare_linear", 10**6)]) == 0
