"""weights_from_examples.workers: N: each candidate loaded partitioned with ZeRO-3 over N Ray workers
gives the single-process losses (fp32, within 1e-5), for decoder and embedding models, while each
worker holds 1/N of the candidate. One embedded Ray cluster and 2 workers for the whole module."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import BertConfig, BertModel

from calm_dist.testing.tiny_checkpoints import char_tokenizer, tiny_llama
from merge.cocktail.examples import read_examples
from merge.cocktail.losses import model_loss
from merge.job import run_merge
from merge.merge_config import ExamplesWeights, validate_config
from merge.merge_errors import ConfigError

EXAMPLES = [("2+2=", "4"), ("The capital of France is", " Paris"), ("abc", "def"), ("Hello", " world!"), ("x", "yz")]


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def test_partitioned_losses_equal_single_process_losses(ray_cluster, tmp_path):
    from merge.execution.partitioned_losses import gpus_for, partitioned_losses

    assert not gpus_for(2)  # a CPU cluster: gloo workers, every GPU hidden from them

    examples_file = tmp_path / "examples.jsonl"
    examples_file.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in EXAMPLES))
    for i, scale in enumerate((1.0, 8.0)):
        tiny_llama(tmp_path / f"m{i}", seed=i, scale=scale, dtype=torch.float32)

    # Decoders, the whole merge job: its report keeps the losses the workers computed.
    cfg = validate_config({
        "method": "linear", "models": [{"path": str(tmp_path / f"m{i}")} for i in range(2)],
        "weights_from_examples": {"examples": str(examples_file), "workers": 2, "batch_size": 2},
        "output": {"path": str(tmp_path / "out")},
    })
    logs: list[str] = []
    run_merge(cfg, show_progress=False, log=logs.append)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    losses = [report["weights"][f"m{i}"]["loss"] for i in range(2)]
    spec = cfg.weights_from_examples
    examples = read_examples(examples_file)
    for i in range(2):
        single = model_loss(tmp_path / f"m{i}", tmp_path / f"m{i}", examples, spec)
        assert abs(losses[i] - single) <= 1e-5, (i, losses[i], single)
    assert any("scored on 2 workers" in line for line in logs)

    # An embedding model, and what each worker held.
    bert = BertConfig(vocab_size=98, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64)
    torch.manual_seed(100)
    BertModel(bert).eval().save_pretrained(tmp_path / "e0")
    char_tokenizer(tmp_path / "e0")
    # LM_Cocktail's embedding examples: a query, its positive passages and negatives.
    embedding_file = tmp_path / "embedding.jsonl"
    embedding_file.write_text("".join(
        json.dumps({"query": i, "pos": [o], "neg": [other for _, other in EXAMPLES if other != o]}) + "\n"
        for i, o in EXAMPLES))
    embedding = ExamplesWeights(examples=embedding_file, kind="embedding", negatives=3, batch_size=3, workers=2)
    queries = read_examples(embedding_file, "embedding", 3)
    held: list[dict] = []
    (loss,) = partitioned_losses([(tmp_path / "e0", tmp_path / "e0")], queries, embedding, print, held)
    assert abs(loss - model_loss(tmp_path / "e0", tmp_path / "e0", queries, embedding)) <= 1e-5
    total = held[0]["total_bytes"]
    assert total == 4 * sum(p.numel() for p in BertModel(bert).parameters())
    assert all(abs(b / total - 0.5) <= 0.01 for b in held[0]["held_bytes"])


def test_workers_and_device_map_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="weights_from_examples.workers: partitioned workers and device_map"):
        validate_config({
            "method": "linear", "models": [{"path": "a"}, {"path": "b"}],
            "weights_from_examples": {"examples": "x.jsonl", "workers": 2, "device_map": "auto"},
            "output": {"path": str(tmp_path / "out")},
        })
