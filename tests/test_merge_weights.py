"""LM-Cocktail weights from examples: softmax(-loss / T) of each model's loss, computed here directly
(one example at a time, no padding) and compared with what the merge job computed, printed and kept."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from merge_fixtures import exact_linear_bf16, read_merged
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from merge.checkpoint import Checkpoint
from merge.config import validate_config
from merge.job import run_merge
from merge.tiny import char_tokenizer, tiny_llama
from merge.weights import cocktail_weights, model_loss, softmax_weights

EXAMPLES = [("2+2=", "4"), ("The capital of France is", " Paris"), ("abc", "def"), ("Hello", " world!"), ("x", "yz")]


def write_examples(path, examples=EXAMPLES):
    path.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in examples))
    return path


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    models = [tiny_llama(root / f"m{i}", seed=i, scale=scale) for i, scale in enumerate((1.0, 40.0, 8.0))]
    return root, models, write_examples(root / "examples.jsonl")


def direct_decoder_loss(model, folder) -> float:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is None
    losses = []
    for prompt, output in EXAMPLES:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = prompt_ids + tokenizer(output, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        losses.append(F.cross_entropy(logits[len(prompt_ids) - 1 : -1], torch.tensor(ids[len(prompt_ids) :])).item())
    return sum(losses) / len(losses)


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
    rows, logs = cocktail(root, tmp_path, examples, temperature=2.0, batch_size=2)
    losses = [rows[f"m{i}"]["loss"] for i in range(3)]
    direct = [direct_decoder_loss(m, root / f"m{i}") for i, m in enumerate(models)]
    assert losses == pytest.approx(direct, rel=2e-3)
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


def test_batching_without_a_pad_token_does_not_change_the_loss(decoders):
    root, _, examples = decoders
    spec = validate_config({
        "method": "linear", "models": [{"path": str(root / "m1")}], "output": {"path": "unused"},
        "weights_from_examples": {"examples": str(examples)},
    }).weights_from_examples
    one = model_loss(root / "m1", root / "m1", EXAMPLES, spec.model_copy(update={"batch_size": 1}))
    five = model_loss(root / "m1", root / "m1", EXAMPLES, spec.model_copy(update={"batch_size": 5}))
    offloaded = model_loss(root / "m1", root / "m1", EXAMPLES, spec.model_copy(update={
        "batch_size": 5, "device_map": "auto", "max_memory": {"cpu": "20KB"}, "offload_folder": root / "offload"}))
    assert five == pytest.approx(one, rel=2e-3)
    assert offloaded == pytest.approx(five, rel=1e-6)


def test_two_step_recipe_fixes_one_weight(decoders, tmp_path):
    root, _, examples = decoders
    rows, _ = cocktail(root, tmp_path, examples, fixed={"m0": 0.6})
    assert rows["m0"] == {"weight": 0.6}
    rest = softmax_weights([rows["m1"]["loss"], rows["m2"]["loss"]], 5.0)
    assert [rows["m1"]["weight"], rows["m2"]["weight"]] == pytest.approx([0.4 * rest[0], 0.4 * rest[1]], rel=1e-12)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    config = BertConfig(vocab_size=98, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    models = []
    for i in range(2):
        torch.manual_seed(100 + i)
        model = BertModel(config).eval()
        model.save_pretrained(root / f"e{i}")
        char_tokenizer(root / f"e{i}")
        models.append(model)
    return root, models, write_examples(root / "examples.jsonl")


def direct_infonce(model, folder, pooling: str) -> float:
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def embed(text):
        with torch.no_grad():
            hidden = model(torch.tensor([tokenizer(text)["input_ids"]])).last_hidden_state[0]
        return F.normalize(hidden[0] if pooling == "cls" else hidden.mean(0), dim=0)

    queries = [embed(q) for q, _ in EXAMPLES]
    passages = [embed(p) for _, p in EXAMPLES]
    losses = []
    for i, q in enumerate(queries):
        order = [i] + [j for j in range(len(EXAMPLES)) if j != i]  # every other output is a negative
        scores = torch.stack([passages[j] @ q for j in order]) / 0.05
        losses.append(-torch.log_softmax(scores, 0)[0].item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embedding_weights_use_infonce(encoders, tmp_path, pooling):
    root, models, examples = encoders
    rows, _ = cocktail(root, tmp_path, examples, names=("e0", "e1"), kind="embedding", pooling=pooling, negatives=10, batch_size=3)
    direct = [direct_infonce(m, root / f"e{i}", pooling) for i, m in enumerate(models)]
    assert [rows["e0"]["loss"], rows["e1"]["loss"]] == pytest.approx(direct, rel=1e-4)
    assert AutoModel.from_pretrained(tmp_path / "out").config.model_type == "bert"


def test_embedding_negatives_are_seeded(encoders):
    root, _, examples = encoders

    def weights(seed):
        cfg = validate_config({
            "method": "linear", "models": [{"path": str(root / "e0")}, {"path": str(root / "e1")}],
            "output": {"path": "unused"},
            "weights_from_examples": {"examples": str(examples), "kind": "embedding", "negatives": 1, "seed": seed},
        })
        return cocktail_weights(cfg, [Checkpoint.open(m.name, m.path) for m in cfg.models], lambda _: None)

    first = weights(0)
    assert weights(0) == first
    assert any(weights(seed)[1] != first[1] for seed in (1, 2)), "other seeds draw other negatives"
