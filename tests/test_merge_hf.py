"""The output is a normal Hugging Face checkpoint: AutoModelForCausalLM loads it, and its logits equal
those of a model built in memory from the formula. Tied embeddings, vocabulary truncation, output
dtype, the process pool and Ray give the documented results."""

from __future__ import annotations

import json

import pytest
import torch
from merge_fixtures import exact_linear_bf16, folder_bytes, read_merged, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from calm_dist.testing.tiny_checkpoints import VOCAB, tiny_llama
from launcher.cli import main as calm
from merge.job import run_merge
from merge.merge_config import load_config, validate_config
from merge.merge_errors import IncompatibleInputsError

IDS = torch.tensor([[1, 40, 41, 42, 3, 50, 60, 70]])
WEIGHTS = [0.5, 0.3, 0.2]


def merge(tmp_path, models, **settings):
    out = tmp_path / "out"
    cfg = validate_config({"method": "linear", "models": [{"path": str(m)} for m in models], "output": {"path": str(out)}, **settings})
    run_merge(cfg, show_progress=False, log=lambda _: None)
    return out


def formula_model(inputs, weights, dtype=torch.bfloat16, config=None) -> LlamaForCausalLM:
    """A model whose every parameter is computed directly from the inputs' state dicts. Parameters in
    `dtype`, buffers (rotary frequencies) left in fp32, as from_pretrained does."""
    states = [m.state_dict() for m in inputs]
    model = LlamaForCausalLM(config or inputs[0].config).eval()
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    if dtype == torch.bfloat16:
        merged = {name: exact_linear_bf16([s[name] for s in states], weights) for name in states[0]}
    else:  # dyadic weights of float32 outputs: float64 arithmetic is exact, one rounding
        merged = {
            name: (sum(s[name].double() * w for s, w in zip(states, weights, strict=True)) / sum(weights)).to(dtype)
            for name in states[0]
        }
    model.load_state_dict(merged)
    return model


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    models = [tiny_llama(root / f"m{i}", seed=i, shard_size="20KB") for i in range(3)]
    return root, models


def test_output_loads_and_its_logits_equal_the_formula_model(llamas, tmp_path):
    root, models = llamas
    out = merge(tmp_path, [root / f"m{i}" for i in range(3)], weights=WEIGHTS, output={"path": str(tmp_path / "out"), "max_shard_size": "30KB"})
    assert len(list(out.glob("model-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, formula_model(models, WEIGHTS)(IDS).logits)
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == AutoTokenizer.from_pretrained(root / "m0")("abc")["input_ids"]
    assert (out / "generation_config.json").read_bytes() == (root / "m0" / "generation_config.json").read_bytes()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "linear" and [r["weight"] for r in report["weights"].values()] == WEIGHTS


def test_output_dtype_float32(llamas, tmp_path):
    root, models = llamas
    out = merge(tmp_path, [root / "m0", root / "m1"], weights=[0.5, 0.5], output={"path": str(tmp_path / "out"), "dtype": "float32"})
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, formula_model(models[:2], [0.5, 0.5], torch.float32)(IDS).logits)


def test_tied_inputs_give_a_tied_output(tmp_path):
    models = [tiny_llama(tmp_path / f"t{i}", seed=10 + i, tie=True) for i in range(2)]
    out = merge(tmp_path, [tmp_path / "t0", tmp_path / "t1"], weights=[0.6, 0.4])
    assert "lm_head.weight" not in read_merged(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, formula_model(models, [0.6, 0.4])(IDS).logits)


def test_tied_and_untied_inputs_give_an_untied_output(tmp_path):
    """The tied model's output embedding is its input embedding (mergekit #464, #615)."""
    tied = tiny_llama(tmp_path / "tied", seed=20, tie=True)
    untied = tiny_llama(tmp_path / "untied", seed=21, tie=False)
    out = merge(tmp_path, [tmp_path / "tied", tmp_path / "untied"], weights=[0.7, 0.3])
    merged = read_merged(out)
    expected = exact_linear_bf16([tied.model.embed_tokens.weight.data, untied.lm_head.weight.data], [0.7, 0.3])
    assert torch.equal(merged["lm_head.weight"], expected)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(loaded.lm_head.weight, merged["lm_head.weight"])


def test_vocabulary_truncation_keeps_the_shared_rows(tmp_path):
    small = tiny_llama(tmp_path / "small", seed=30, vocab=VOCAB)
    large = tiny_llama(tmp_path / "large", seed=31, vocab=VOCAB + 2)
    models = [tmp_path / "small", tmp_path / "large"]
    with pytest.raises(IncompatibleInputsError, match="output.copy_files_from: vocab_policy truncate keeps 98 tokens"):
        merge(tmp_path, models, vocab_policy="truncate", output={"path": str(tmp_path / "out"), "copy_files_from": "large"})
    assert not (tmp_path / "out").exists()
    out = merge(tmp_path, models, weights=[0.5, 0.5], vocab_policy="truncate")
    merged = read_merged(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = [small.state_dict()[name], large.state_dict()[name][:VOCAB]]
        assert torch.equal(merged[name], exact_linear_bf16(rows, [0.5, 0.5]))
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == VOCAB


def test_process_pool_and_cli_give_the_same_bytes(llamas, tmp_path):
    root, _ = llamas
    settings = {"method": "ties", "base_model": "m0", "parameters": {"density": 0.4},
                "models": [{"path": str(root / f"m{i}")} for i in range(3)],
                "output": {"path": str(tmp_path / "one"), "max_shard_size": "30KB"}}
    run_merge(load_config(write_config(tmp_path, settings)), show_progress=False, log=lambda _: None)
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", str(tmp_path / "merge.yaml"), "--workers", "2", "--memory-budget", "2GB", "-o", str(tmp_path / "pool")])
    assert exit_.value.code == 0
    assert folder_bytes(tmp_path / "pool") == folder_bytes(tmp_path / "one")


def test_ray_tasks_give_the_same_bytes(llamas, tmp_path):
    ray = pytest.importorskip("ray")
    root, _ = llamas
    settings = {"method": "dare_linear", "base_model": "m1", "parameters": {"density": 0.5},
                "models": [{"path": str(root / f"m{i}")} for i in range(3)],
                "output": {"path": str(tmp_path / "local"), "max_shard_size": "30KB"}}
    run_merge(validate_config(settings), show_progress=False, log=lambda _: None)
    started = not ray.is_initialized()  # another test's Ray, if still up, is reused as is
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        settings["output"]["path"] = str(tmp_path / "ray")
        run_merge(validate_config(settings), address="local", show_progress=False, log=lambda _: None)
    finally:
        if started:
            ray.shutdown()
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "local")
