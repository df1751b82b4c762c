"""LM-Cocktail weights from examples: LM_Cocktail's own recipe, checked against numbers computed once with
LM_Cocktail itself and against the recipe written out one unpadded example at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures.lm_cocktail_reference import build
from merge_fixtures import exact_linear_bf16, read_merged
from transformers import AutoTokenizer

from calm_dist.testing.tiny_checkpoints import tiny_llama
from merge.cocktail.losses import model_loss
from merge.cocktail.weights import softmax_weights
from merge.io.checkpoint_folder import Checkpoint
from merge.job import cocktail_weights, run_merge
from merge.merge_config import validate_config

REFERENCE = Path(__file__).parent / "fixtures" / "lm_cocktail_reference.json"
EXAMPLES = [("2+2=", "4"), ("The capital of France is", " Paris"), ("abc", "def"), ("Hello", " world!"), ("x", "yz")]


def write_examples(path, examples=EXAMPLES):
    path.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in examples))
    return path


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    models = [tiny_llama(root / f"m{i}", seed=i, scale=scale) for i, scale in enumerate((1.0, 40.0, 8.0))]
    return root, models, write_examples(root / "examples.jsonl")


def direct_decoder_loss(model, folder, batch_size: int) -> float:
    """LM_Cocktail's recipe written out one unpadded example at a time: `input + ' ' + output` + EOS,
    the input's tokens masked, token mean per batch, mean over batches."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is None
    batches = []
    for first in range(0, len(EXAMPLES), batch_size):
        token_losses = []
        for prompt, output in EXAMPLES[first : first + batch_size]:
            ids = tokenizer(prompt + " " + output)["input_ids"] + [tokenizer.eos_token_id]
            masked = len(tokenizer(prompt)["input_ids"])
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            token_losses.append(F.cross_entropy(logits[masked - 1 : -1], torch.tensor(ids[masked:]), reduction="none"))
        batches.append(torch.cat(token_losses).mean().item())
    return sum(batches) / len(batches)


def cocktail(root, tmp_path, examples, names=("m0", "m1", "m2"), **spec):
    logs: list[str] = []
    cfg = validate_config({
        "method": "linear", "models": [{"path": str(root / n)} for n in names],
        "weights_from_examples": {"examples": str(examples), **spec}, "output": {"path": str(tmp_path / "out")},
    })
    run_merge(cfg, show_progress=False, log=logs.append)
    return json.loads((tmp_path / "out" / "merge_report.json").read_text())["weights"], "\n".join(logs).splitlines()


def test_decoder_weights_are_the_softmax_of_minus_loss_over_t(decoders, tmp_path):
    root, models, examples = decoders
    rows, logs = cocktail(root, tmp_path, examples, temperature=2.0, batch_size=1)
    losses = [rows[f"m{i}"]["loss"] for i in range(3)]
    direct = [direct_decoder_loss(m, root / f"m{i}", batch_size=1) for i, m in enumerate(models)]
    assert losses == pytest.approx(direct, rel=1e-3)  # bf16 models: kernels with and without a mask differ
    assert len({round(loss, 1) for loss in losses}) == 3, "the models should differ"
    weights = [rows[f"m{i}"]["weight"] for i in range(3)]
    assert weights == pytest.approx(softmax_weights(losses, 2.0), rel=1e-12)
    assert weights == pytest.approx([math.exp(-loss / 2) / sum(math.exp(-x / 2) for x in losses) for loss in losses])
    assert any(line.startswith("loss of m1 on 5 examples: ") for line in logs)
    assert any(line.startswith("m2 ") and f"{weights[2]:.6f}" in line for line in logs)
    merged = read_merged(tmp_path / "out")
    states = [m.state_dict() for m in models]
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(merged[name], exact_linear_bf16([s[name] for s in states], weights))


def test_padding_without_a_pad_token_does_not_change_a_batch_loss(decoders):
    root, models, examples = decoders
    spec = validate_config({
        "method": "linear", "models": [{"path": str(root / "m1")}], "output": {"path": "unused"},
        "weights_from_examples": {"examples": str(examples)},
    }).weights_from_examples
    one = model_loss(root / "m1", root / "m1", EXAMPLES, spec.model_copy(update={"batch_size": 1}))
    five = model_loss(root / "m1", root / "m1", EXAMPLES, spec.model_copy(update={"batch_size": 5}))
    offloaded = model_loss(root / "m1", root / "m1", EXAMPLES, spec.model_copy(update={
        "batch_size": 5, "device_map": "auto", "max_memory": {"cpu": "20KB"}, "offload_folder": root / "offload"}))
    assert one == pytest.approx(direct_decoder_loss(models[1], root / "m1", batch_size=1), rel=1e-3)
    assert five == pytest.approx(direct_decoder_loss(models[1], root / "m1", batch_size=5), rel=1e-3)
    assert offloaded == pytest.approx(five, rel=1e-6)


def test_two_step_recipe_fixes_one_weight(decoders, tmp_path):
    root, _, examples = decoders
    rows, _ = cocktail(root, tmp_path, examples, fixed={"m0": 0.6})
    assert rows["m0"] == {"weight": 0.6}
    rest = softmax_weights([rows["m1"]["loss"], rows["m2"]["loss"]], 5.0)
    assert [rows["m1"]["weight"], rows["m2"]["weight"]] == pytest.approx([0.4 * rest[0], 0.4 * rest[1]], rel=1e-12)


@pytest.fixture(scope="module")
def reference_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return root, build(root), json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("kind", ["decoder", "embedding"])
def test_weights_and_losses_match_lm_cocktail(reference_models, kind):
    """Numbers computed once with LM_Cocktail 0.0.4 itself (tests/fixtures/lm_cocktail_reference.py)."""
    root, folders, reference = reference_models
    models = folders["decoder" if kind == "decoder" else "encoder"]
    cfg = validate_config({
        "method": "linear", "models": [{"path": str(m)} for m in models], "output": {"path": "unused"},
        "weights_from_examples": {"examples": str(root / f"{kind}.jsonl"), "kind": kind, "seed": reference["negatives_seed"]},
    })
    weights, losses = cocktail_weights(cfg, [Checkpoint.open(m.name, m.path) for m in cfg.models], lambda _: None)
    assert weights == pytest.approx(reference[kind]["weights"], abs=1e-4)
    assert losses == pytest.approx(reference[kind]["losses"], abs=1e-4)
    assert max(reference[kind]["weights"]) - min(reference[kind]["weights"]) > 10 * 1e-4, "the fixture must discriminate"


def test_embedding_negatives_are_seeded(reference_models):
    root, folders, _ = reference_models

    def weights(seed):
        cfg = validate_config({
            "method": "linear", "models": [{"path": str(m)} for m in folders["encoder"]], "output": {"path": "unused"},
            "weights_from_examples": {"examples": str(root / "embedding.jsonl"), "kind": "embedding", "negatives": 2, "seed": seed},
        })
        return cocktail_weights(cfg, [Checkpoint.open(m.name, m.path) for m in cfg.models], lambda _: None)

    first = weights(0)
    assert weights(0) == first
    assert any(weights(seed)[1] != first[1] for seed in (1, 2)), "other seeds draw other negatives"
