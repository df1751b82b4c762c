"""DELLA (della, della_linear) through the whole job: against a whole-tensor computation of its formula
on tensors whose rows straddle the flat blocks, its row-ranked keep chances, its reproducibility across
chunking, workers and seeds, and its refusals. Its agreement with mergekit 0.1.5 is in
test_merge_methods_mergekit.py (fixtures della*)."""

from __future__ import annotations

import pytest
import torch
from merge_fixtures import budget_for_blocks, random_tensors, raw_checkpoint, read_merged

from merge.job import run_merge
from merge.merge_config import validate_config
from merge.merge_errors import ConfigError
from merge.methods.blocks import Block, block_uniform
from merge.methods.sparse import mix
from merge.methods.specs import BLOCK, SPECS, block_elements

NAMES = ["m0", "m1", "m2", "m3"]
# Rows of 1000 elements: 262 to a block, so the embedding is 3 row blocks, none aligned to BLOCK.
SHAPES = {"embed.weight": (700, 1000), "layer.weight": (300, 1000), "norm.weight": (1000,)}
# The plan sizes chunks by the widest output (the int64 buffer, 3 copies) and the widest inputs (4 fp32, 2 copies).
PER_ELEMENT = 3 * 8 + 2 * 4 * 4
# The largest tensor's keep masks, a bit an element per task vector, held from the L1 pass to the merge's.
HELD_MASK_BYTES = 700 * 1000 // 8 * (len(NAMES) - 1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("della")
    base = random_tensors(0, SHAPES, torch.float32)
    models = []
    for seed, name in enumerate(NAMES):
        tensors = base if seed == 0 else {n: base[n] + 0.1 * t for n, t in random_tensors(seed, SHAPES, torch.float32).items()}
        raw_checkpoint(root / name, {**tensors, "buf.ids": torch.arange(10, dtype=torch.int64)}, shards=2)
        models.append(tensors)
    return root, models


def merge(root, out, method: str, blocks: int = 1, workers: int = 1, seed: int = 0, count: int = 4, **settings):
    cfg = validate_config({
        "method": method, "models": [{"path": str(root / n)} for n in NAMES[:count]], "base_model": "m0",
        "output": {"path": str(out), "max_shard_size": 1_500_000}, "seed": seed, "workers": workers,
        "memory_budget": budget_for_blocks(blocks, PER_ELEMENT, workers, HELD_MASK_BYTES), **settings,
    })
    run_merge(cfg, show_progress=False, log=lambda _: None)
    return read_merged(out)


def whole_tensor_della(name: str, xs: list[torch.Tensor], weights, density, epsilon, seed, ties, normalize, scale,
                       rescale) -> torch.Tensor:
    """mergekit's della_magprune on the whole tensor (two argsorts over each row), with calm-dist's draws
    per row block concatenated; the L1 norms summed in fp64 and rounded to fp32, as calm-dist defines them."""
    shape = xs[0].shape
    block = block_elements(SPECS["della"], shape)
    numel = xs[0].numel()
    tvs = []
    for model, x in enumerate(xs[1:], start=1):
        delta = x - xs[0]
        rows = delta.reshape(1, -1) if delta.dim() == 1 else delta
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32) + 1
        low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        chances = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
        draws = torch.cat([block_uniform(Block(name, k, min(block, numel - start), seed), model)
                           for k, start in enumerate(range(0, numel, block))])
        masked = delta * (draws < chances.reshape(-1)).reshape(shape).to(torch.float32)
        if rescale:
            before = torch.tensor(delta.abs().double().sum().item(), dtype=torch.float32)
            after = torch.tensor(masked.abs().double().sum().item(), dtype=torch.float32)
            masked = masked * (before / after)
        tvs.append(masked.reshape(-1))
    return mix(xs[0].reshape(-1), tvs, weights, ties, normalize, scale).reshape(shape)


@pytest.mark.parametrize(("method", "parameters"), [
    ("della", {"density": 0.5, "epsilon": 0.2}),
    ("della_linear", {"density": 0.4, "epsilon": 0.3, "lambda": 1.5, "rescale": False}),
])
def test_della_is_its_whole_tensor_formula_across_row_blocks(inputs, tmp_path, method, parameters):
    root, models = inputs
    weights = [1.0, 0.6, -0.4]
    out = merge(root, tmp_path / "out", method, weights=weights, parameters=parameters)
    params = SPECS[method].params.model_validate(parameters)
    for name in SHAPES:
        expected = whole_tensor_della(name, [m[name] for m in models], weights, params.density, params.epsilon, 0,
                                      method == "della", params.normalize, params.scale, params.rescale)
        assert torch.equal(out[name], expected), name
    assert torch.equal(out["buf.ids"], torch.arange(10))


def test_keep_chance_grows_with_the_rank_in_the_row(inputs, tmp_path):
    """One task vector, weight 1, no rescale: the output differs from the base exactly where an element
    was kept. Density 0.5 +- 0.4: the smallest tenth of each row is kept about 14% of the time, the
    largest about 86%, and half of everything."""
    root, models = inputs
    out = merge(root, tmp_path / "out", "della_linear", count=2, weights=[1.0],
                parameters={"density": 0.5, "epsilon": 0.4, "rescale": False})
    base, x = models[0]["embed.weight"], models[1]["embed.weight"]
    kept = out["embed.weight"] != base
    assert torch.equal(out["embed.weight"][kept], x[kept])
    ranks = torch.argsort(torch.argsort((x - base).abs(), dim=1), dim=1)
    smallest, largest = kept[ranks < 100].float().mean().item(), kept[ranks >= 900].float().mean().item()
    assert 0.11 < smallest < 0.17 and 0.83 < largest < 0.89, (smallest, largest)
    assert abs(kept.float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_is_reproducible_across_chunking_workers_and_runs(inputs, tmp_path, method):
    root, _ = inputs
    settings = {"weights": [0.5, 0.8, 0.3], "parameters": {"density": 0.6, "epsilon": 0.1}}
    one = merge(root, tmp_path / "one", method, blocks=1, **settings)
    large = merge(root, tmp_path / "large", method, blocks=5, **settings)
    two = merge(root, tmp_path / "two", method, blocks=2, workers=2, **settings)
    again = merge(root, tmp_path / "again", method, blocks=1, **settings)
    other = merge(root, tmp_path / "other", method, blocks=1, seed=1, **settings)
    assert one.keys() == large.keys() == two.keys() == again.keys()
    assert all(torch.equal(one[n], r[n]) for r in (large, two, again) for n in one)
    assert not torch.equal(one["embed.weight"], other["embed.weight"])


@pytest.mark.parametrize("blocks", [1, 5])  # the tensors read twice (chunks of one block), and held whole
def test_each_keep_mask_is_decided_once(inputs, tmp_path, monkeypatch, blocks):
    """The L1 norms' pass keeps each block's compiled mask for the merge pass: della_keep runs once per
    row block and task vector (3 + 2 + 1 blocks, 3 task vectors), where it ran in both passes."""
    from merge.methods import fast_kernel

    root, models = inputs
    decided = []
    keep = fast_kernel.della_keep
    monkeypatch.setattr(fast_kernel, "della_keep", lambda *args: decided.append(args[3]) or keep(*args))
    out = merge(root, tmp_path / "out", "della", blocks=blocks, weights=[1.0, 0.6, -0.4],
                parameters={"density": 0.5, "epsilon": 0.2})
    assert len(decided) == 6 * 3 and len(set(decided)) == 6 * 3  # each (block, model) key once
    params = SPECS["della"].params.model_validate({"density": 0.5, "epsilon": 0.2})
    expected = whole_tensor_della("embed.weight", [m["embed.weight"] for m in models], [1.0, 0.6, -0.4],
                                  params.density, params.epsilon, 0, True, params.normalize, params.scale, params.rescale)
    assert torch.equal(out["embed.weight"], expected)


def test_row_blocks_are_whole_rows_within_block():
    spec = SPECS["della"]
    assert block_elements(spec, (700, 1000)) == 262 * 1000
    assert block_elements(spec, (4096, 14336)) == 18 * 14336
    assert block_elements(spec, (1000,)) == 262 * 1000  # a vector is one row (one block, whatever its length)
    assert block_elements(spec, (8, 4, 1000)) == 65 * 4000  # a slab along the first dimension
    assert block_elements(SPECS["dare_ties"], (700, 1000)) == BLOCK


def test_epsilon_outside_the_density_window_is_refused(tmp_path):
    config = {"method": "della", "models": [{"path": str(tmp_path / n)} for n in NAMES[:3]], "base_model": "m0",
              "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(ConfigError, match=r"parameters: .*epsilon: density ± epsilon must lie strictly between 0 and 1 "
                                          r"\(density 0.9, epsilon 0.15\)"):
        validate_config(config | {"parameters": {"density": 0.9}})
    with pytest.raises(ConfigError, match=r"overrides\[0\]\.parameters: .*epsilon"):
        validate_config(config | {"overrides": [{"pattern": "x*", "parameters": {"density": 0.1, "epsilon": 0.1}}]})
    with pytest.raises(ConfigError, match=r"parameters\.epsilon: Input should be greater than or equal to 0"):
        validate_config(config | {"parameters": {"density": 0.5, "epsilon": -0.1}})
    validate_config(config | {"parameters": {"density": 1.0, "epsilon": 0.5}})  # density 1 ranks nothing


@pytest.mark.parametrize(("shape", "reason"), [
    ((64, 1), r"shape \[64, 1\] gives rows of 1 element"),
    ((BLOCK + 8,), rf"rows of up to {BLOCK} elements; shape \[{BLOCK + 8}\] has rows of {BLOCK + 8}"),
])
def test_tensors_della_cannot_rank_are_refused_before_any_output(tmp_path, shape, reason):
    for seed, name in enumerate(NAMES[:3]):
        raw_checkpoint(tmp_path / name, random_tensors(seed, {"odd.weight": shape, "fine.weight": (4, 8)}))
    config = {"method": "della", "models": [{"path": str(tmp_path / n)} for n in NAMES[:3]], "base_model": "m0",
              "parameters": {"density": 0.5}, "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(ConfigError, match=rf"tensor 'odd.weight': .*{reason}.*parameters.density: 1"):
        run_merge(validate_config(config), show_progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()
    overridden = config | {"overrides": [{"pattern": "odd.*", "parameters": {"density": 1.0}}]}
    run_merge(validate_config(overridden), show_progress=False, log=lambda _: None)
    merged = read_merged(tmp_path / "out")
    inputs = [read_merged(tmp_path / n)["odd.weight"].float() for n in NAMES[:3]]
    # density 1: mergekit's task arithmetic of the whole task vectors (normalize: della's default).
    flat = [x.reshape(-1) for x in inputs]
    expected = mix(flat[0], [x - flat[0] for x in flat[1:]], [1.0, 1.0], True, True, 1.0).reshape(shape)
    assert torch.equal(merged["odd.weight"], expected.to(torch.bfloat16))


def test_calm_plan_sizes_della_and_refuses_what_the_merge_refuses(inputs, tmp_path):
    from launcher.plan.command import merge_setup
    from merge.planning.memory import merge_terms

    root, _ = inputs
    config = {"method": "della", "models": [{"path": str(root / n)} for n in NAMES], "base_model": "m0",
              "parameters": {"density": 0.5}, "output": {"path": str(tmp_path / "out")}}
    setup, tasks = merge_setup(validate_config(config))
    terms = {t.name: t for t in merge_terms(setup).terms}
    assert terms["fp32 block arithmetic"].note.startswith("della: 30 arrays")  # 7 per input, 4 inputs, +2
    assert terms["whole-tensor statistic"].note.startswith("1 pass(es)")
    assert terms["masks held for the merge pass"].bytes == HELD_MASK_BYTES  # the embedding's, 3 task vectors
    assert all(t.chunk(tasks[0].chunk_elems) % t.block == 0 for task in tasks for t in task.tensors)
    odd = tmp_path / "odd"
    for seed, name in enumerate(NAMES[:2]):
        raw_checkpoint(odd / name, random_tensors(seed, {"col.weight": (16, 1)}))
    config["models"] = [{"path": str(odd / n)} for n in NAMES[:2]]
    with pytest.raises(ConfigError, match=r"tensor 'col.weight': della ranks"):
        merge_setup(validate_config(config))
