"""passthrough with layer slices (frankenmerges): the output's layers are copies of the slices' layers,
renumbered; embeddings from slices[0]'s model, final norm and output embedding from slices[-1]'s
(mergekit 0.1.5's rule, and its outputs in tests/fixtures/mergekit/passthrough/); every input tensor
accounted for; bad slices refused before any work, naming the key."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_fixtures import folder_bytes, raw_checkpoint, read_merged, write_config
from safetensors.torch import load_file
from test_merge_resume import KILLER
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from calm_dist.testing.tiny_checkpoints import char_tokenizer
from launcher.cli import main as calm
from launcher.plan.command import describe_merge, merge_setup
from merge.io.manifest import verify
from merge.job import run_merge
from merge.merge_config import load_config, validate_config
from merge.merge_errors import ConfigError, IncompatibleInputsError
from merge.planning.config_only import plan_inputs

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit"
CASES = json.loads((FIXTURES / "passthrough" / "cases.json").read_text())
LAYER = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
         "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
         "mlp.up_proj.weight", "mlp.down_proj.weight")


def tiny(folder: Path, seed: int, layers: int, tie: bool = False, qwen_layer_types: list[str] | None = None):
    """A seeded bf16 Llama (or Qwen2 with these layer_types) of `layers` layers, saved with a tokenizer."""
    torch.manual_seed(seed)
    dims = dict(vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=64)
    if qwen_layer_types is not None:
        model = Qwen2ForCausalLM(Qwen2Config(**dims, layer_types=qwen_layer_types, use_sliding_window=True,
                                             sliding_window=4))
    else:
        model = LlamaForCausalLM(LlamaConfig(**dims))
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    char_tokenizer(folder)
    return model


def passthrough(tmp_path: Path, slices: list[tuple[str, list[int]]], names: tuple[str, ...] = ("a", "b"), **extra) -> dict:
    raw = {"method": "passthrough", "models": [{"name": n, "path": str(tmp_path / n)} for n in names],
           "slices": [{"sources": [{"model": m, "layer_range": r}]} for m, r in slices],
           "output": {"path": str(tmp_path / "out")}} | extra
    return raw


def merge(raw: dict) -> dict:
    run_merge(validate_config(raw), show_progress=False, log=lambda _: None)
    return json.loads((Path(raw["output"]["path"]) / "merge_report.json").read_text())


@pytest.fixture(scope="module")
def frankenmerge(tmp_path_factory):
    """a (4 layers) and b (6 layers) merged as a [0, 4] + b [2, 6]: 8 layers."""
    root = tmp_path_factory.mktemp("passthrough")
    models = {"a": tiny(root / "a", 0, 4), "b": tiny(root / "b", 1, 6)}
    report = merge(passthrough(root, [("a", [0, 4]), ("b", [2, 6])]))
    return root, models, report


def test_output_layers_are_the_chosen_input_layers_bit_for_bit(frankenmerge):
    root, _, _ = frankenmerge
    out, a, b = (load_file(str(root / n / "model.safetensors")) for n in ("out", "a", "b"))
    chosen = [(a, 0), (a, 1), (a, 2), (a, 3), (b, 2), (b, 3), (b, 4), (b, 5)]
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"], "model.norm.weight": b["model.norm.weight"],
                "lm_head.weight": b["lm_head.weight"]}
    for k, (model, layer) in enumerate(chosen):
        expected |= {f"model.layers.{k}.{t}": model[f"model.layers.{layer}.{t}"] for t in LAYER}
    assert out.keys() == expected.keys()
    for name, tensor in expected.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name].view(torch.int16), tensor.view(torch.int16)), name
    config = json.loads((root / "out" / "config.json").read_text())
    assert config == json.loads((root / "a" / "config.json").read_text()) | {"num_hidden_layers": 8}
    assert (root / "out" / "tokenizer.json").read_bytes() == (root / "a" / "tokenizer.json").read_bytes()


def test_the_output_loads_and_computes_what_the_hand_assembled_model_does(frankenmerge):
    root, models, _ = frankenmerge
    loaded = AutoModelForCausalLM.from_pretrained(root / "out").eval()
    assert loaded.config.num_hidden_layers == 8 and len(loaded.model.layers) == 8
    config = LlamaConfig.from_pretrained(root / "a")
    config.num_hidden_layers = 8
    hand = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()  # as loaded: rotary tables in fp32
    hand.model.embed_tokens.load_state_dict(models["a"].model.embed_tokens.state_dict())
    for k, (name, layer) in enumerate([("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 2), ("b", 3), ("b", 4), ("b", 5)]):
        hand.model.layers[k].load_state_dict(models[name].model.layers[layer].state_dict())
    hand.model.norm.load_state_dict(models["b"].model.norm.state_dict())
    hand.lm_head.load_state_dict(models["b"].lm_head.state_dict())
    ids = torch.tensor([[1, 40, 41, 42, 5, 17, 60, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hand(ids).logits)


def test_the_report_accounts_for_every_input_tensor_and_verify_passes(frankenmerge, capsys):
    root, _, report = frankenmerge
    # a: everything but its final norm and output embedding; b: layers 2-5 and those two.
    assert report["tensors"] == {"a": {"merged": 0, "copied": 37, "not_used": 2, "dropped": 0},
                                 "b": {"merged": 0, "copied": 38, "not_used": 19, "dropped": 0}}
    assert report["dropped"] == []
    not_used = {(d["tensor"], tuple(d["models"]), d["rule"]) for d in report["not_used"]}
    after = "slices: the tensors after the layers come from slices[-1]'s model, 'b'"
    assert not_used == ({("model.norm.weight", ("a",), after), ("lm_head.weight", ("a",), after),
                         ("model.embed_tokens.weight", ("b",), "slices: the embeddings come from slices[0]'s model, 'a'")}
                        | {(f"model.layers.{i}.{t}", ("b",), "slices: its layer is in no slice's layer_range")
                           for i in (0, 1) for t in LAYER})
    assert report["copied_from"]["model.layers.4.mlp.up_proj.weight"] == ["b", "model.layers.2.mlp.up_proj.weight"]
    assert report["slices"] == [{"sources": [{"model": "a", "layer_range": [0, 4]}]},
                                {"sources": [{"model": "b", "layer_range": [2, 6]}]}]
    assert verify(root / "out") == []
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", "--verify", str(root / "out")])
    assert exit_.value.code == 0 and capsys.readouterr().out.splitlines()[-1] == f"{root / 'out'}: OK"


def test_verify_finds_an_input_tensor_the_slices_do_not_account_for(tmp_path):
    raw_checkpoint(tmp_path / "a", {"model.embed_tokens.weight": torch.ones(4, 2), "model.layers.0.w": torch.ones(2),
                                    "model.layers.1.w": torch.full((2,), 2.0), "model.norm.weight": torch.ones(2)},
                   {"num_hidden_layers": 2, "tie_word_embeddings": True})
    merge(passthrough(tmp_path, [("a", [1, 2]), ("a", [1, 2])], names=("a",)))
    assert read_merged(tmp_path / "out").keys() == {"model.embed_tokens.weight", "model.layers.0.w",
                                                    "model.layers.1.w", "model.norm.weight"}
    assert verify(tmp_path / "out") == []
    raw_checkpoint(tmp_path / "a", {"model.embed_tokens.weight": torch.ones(4, 2), "model.layers.0.w": torch.ones(2),
                                    "model.layers.1.w": torch.ones(2), "model.norm.weight": torch.ones(2),
                                    "extra": torch.ones(1)}, {"num_hidden_layers": 2, "tie_word_embeddings": True})
    assert verify(tmp_path / "out") == ["input 'a' tensor 'extra': not in the output, and no rule of the merge drops it"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_mergekit_bitwise(name, tmp_path):
    case = CASES[name]
    reference = load_file(str(FIXTURES / "passthrough" / f"{name}.safetensors"))
    models = sorted({s["model"] for s in case["slices"]})
    raw = {"method": "passthrough", "models": [{"path": str(FIXTURES / "inputs" / m)} for m in models],
           "slices": [{"sources": [s]} for s in case["slices"]], "output": {"path": str(tmp_path / "out")}}
    merge(raw)
    ours = read_merged(tmp_path / "out")
    assert ours.keys() == reference.keys()
    for tensor, expected in reference.items():
        assert torch.equal(ours[tensor], expected), tensor
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == case["num_hidden_layers"]


@pytest.mark.parametrize(("tie_a", "tie_b"), [(True, True), (True, False), (False, True)])
def test_tied_embeddings_stay_tied_and_an_untied_head_is_stored(tmp_path, tie_a, tie_b):
    a, b = tiny(tmp_path / "a", 0, 2, tie=tie_a), tiny(tmp_path / "b", 1, 2, tie=tie_b)
    report = merge(passthrough(tmp_path, [("a", [0, 1]), ("b", [1, 2])]))
    out = read_merged(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.model.embed_tokens.weight, a.model.embed_tokens.weight)
    if tie_a and tie_b:
        assert "lm_head.weight" not in out and config["tie_word_embeddings"] is True
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    else:  # the output embedding of b: its own, or its input embedding where it ties
        assert config["tie_word_embeddings"] is False
        assert torch.equal(out["lm_head.weight"], b.lm_head.weight)
        assert torch.equal(loaded.lm_head.weight, b.lm_head.weight)
        source = "model.embed_tokens.weight" if tie_b else "lm_head.weight"
        assert report["copied_from"]["lm_head.weight"] == ["b", source]
    assert verify(tmp_path / "out") == []


def test_per_layer_config_lists_are_sliced_with_the_layers(tmp_path):
    tiny(tmp_path / "a", 0, 3, qwen_layer_types=["full_attention", "sliding_attention", "full_attention"])
    tiny(tmp_path / "b", 1, 2, qwen_layer_types=["sliding_attention", "sliding_attention"])
    merge(passthrough(tmp_path, [("a", [1, 3]), ("b", [0, 1]), ("a", [0, 1])], output={"path": str(tmp_path / "out"),
                                                                                       "dtype": "float32"}))
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.num_hidden_layers == 4
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    out, a = read_merged(tmp_path / "out"), load_file(str(tmp_path / "a" / "model.safetensors"))
    # output.dtype converts the copies: bf16 widened to fp32 is exact.
    assert out["model.layers.3.self_attn.q_proj.bias"].dtype == torch.float32
    assert torch.equal(out["model.layers.3.self_attn.q_proj.bias"], a["model.layers.0.self_attn.q_proj.bias"].float())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.layer_types == config.layer_types


@pytest.mark.parametrize(("change", "message"), [
    ({"method": "linear"}, "slices: only passthrough takes layer slices; linear merges whole models"),
    ({"slices": None}, "slices: passthrough assembles the output from layer slices; give at least one, e.g. slices: "
                       "[{sources: [{model: NAME, layer_range: [0, 4]}]}]"),
    ({"slices": []}, "slices: passthrough assembles the output from layer slices; give at least one, e.g. slices: "
                     "[{sources: [{model: NAME, layer_range: [0, 4]}]}]"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}]},
     "slices[0].sources: 2 given; passthrough copies each slice from one model (mixing a slice's sources, as "
     "mergekit's other methods do, is not supported)"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "c", "layer_range": [0, 1]}]}]},
     "slices[1].sources[0].model: no model named 'c' (models: a, b)"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "b", "layer_range": [3, 3]}]}]},
     r"slices[1].sources[0].layer_range: [3, 3] holds no layer; give [start, end] with start < end (end is not included)"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, -1]}]}]},
     "slices[0].sources[0].layer_range[1]: Input should be greater than or equal to 0"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
     "models[1]: 'b' is in no slice; passthrough copies only from the models its slices name"),
    ({"weights": [0.5, 0.5]}, "weights: passthrough takes no weights (its parameters say how to mix)"),
    ({"base_model": "a"}, "base_model: passthrough does not use a base model"),
    ({"parameters": {"scale": 2}}, "parameters.scale: Extra inputs are not permitted"),
    ({"overrides": [{"pattern": "lm_head.*"}]}, "overrides: not with passthrough, which has no parameters to override"),
    ({"output": {"path": "out", "copy_files_from": "b"}}, "output.copy_files_from: not with passthrough, which writes "
     "the config and tokenizer of slices[0]'s model, whose embeddings it has"),
])
def test_bad_slices_are_refused_naming_the_key(tmp_path, change, message):
    raw = passthrough(tmp_path, [("a", [0, 2]), ("b", [0, 1])]) | change
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    assert str(caught.value) == f"config: {message}"


def test_slices_the_inputs_cannot_give_are_refused_before_any_work(tmp_path):
    tiny(tmp_path / "a", 0, 2)
    tiny(tmp_path / "b", 1, 4)
    with pytest.raises(ConfigError, match=r"^slices\[1\]\.sources\[0\]\.layer_range: \[2, 6\] goes past the 4 layers of "
                                          r"model 'b' \(its config\.json\)$"):
        merge(passthrough(tmp_path, [("a", [0, 2]), ("b", [2, 6])]))
    wide = tmp_path / "wide"
    torch.manual_seed(2)
    LlamaForCausalLM(LlamaConfig(vocab_size=98, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    with pytest.raises(IncompatibleInputsError, match=r"^tensor 'model\.layers\.0\.input_layernorm\.weight' of model "
                                                      r"'wide' \(output 'model\.layers\.2\.input_layernorm\.weight'\) "
                                                      r"has shape \[16\], but"):
        merge(passthrough(tmp_path, [("a", [0, 2]), ("wide", [0, 1])], names=("a", "wide")))
    assert not (tmp_path / "out").exists()


def test_drop_leaves_tensors_out_before_slicing(tmp_path):
    tiny(tmp_path / "a", 0, 2)
    tiny(tmp_path / "b", 1, 2)
    report = merge(passthrough(tmp_path, [("a", [0, 2]), ("b", [0, 2])], drop=["model.layers.1.mlp.*"]))
    out = read_merged(tmp_path / "out")
    assert [n for n in out if ".mlp." in n and n.startswith(("model.layers.1.", "model.layers.3."))] == []
    assert len([n for n in out if n.startswith("model.layers.")]) == 4 * 9 - 2 * 3
    assert report["tensors"]["a"] == {"merged": 0, "copied": 16, "not_used": 2, "dropped": 3}
    assert verify(tmp_path / "out") == []


def test_calm_plan_counts_copies_from_the_weights_and_from_the_configs_alike(tmp_path):
    tiny(tmp_path / "a", 0, 2)
    tiny(tmp_path / "b", 1, 4)
    raw = passthrough(tmp_path, [("a", [0, 2]), ("b", [1, 4])])
    from_weights = validate_config(raw)
    setup, tasks = merge_setup(from_weights)
    merge(raw)
    out = read_merged(tmp_path / "out")
    assert setup.total_read_bytes == setup.output_bytes == sum(t.numel() * t.element_size() for t in out.values())
    assert setup.tensor_sources == 1 and setup.inputs == 2
    text = describe_merge(from_weights, setup, tasks, "100MB")
    assert "fp32 block arithmetic" in text and "passthrough: copies, no arithmetic" in text
    # Before the download: b's weights not there yet, its config beside the config: key.
    (tmp_path / "b-config").mkdir()
    (tmp_path / "b-config" / "config.json").write_bytes((tmp_path / "b" / "config.json").read_bytes())
    raw["models"][1] = {"name": "b", "path": str(tmp_path / "download" / "b"), "config": str(tmp_path / "b-config")}
    before = validate_config(raw)
    inputs = plan_inputs(before)
    assert [i.from_config is not None for i in inputs] == [False, True]
    planned, _ = merge_setup(before, inputs)
    assert planned == setup


def test_a_killed_passthrough_resumes_to_identical_bytes(tmp_path):
    tiny(tmp_path / "a", 0, 2)
    tiny(tmp_path / "b", 1, 3)
    raw = passthrough(tmp_path, [("a", [0, 2]), ("b", [0, 3]), ("a", [1, 2])],
                      output={"path": str(tmp_path / "reference"), "max_shard_size": 20_000})
    run_merge(load_config(write_config(tmp_path, raw)), show_progress=False, log=lambda _: None)
    assert len(list((tmp_path / "reference").glob("model-*.safetensors"))) > 2
    (tmp_path / "killer.py").write_text(KILLER)
    killed = write_config(tmp_path, raw | {"output": raw["output"] | {"path": str(tmp_path / "out")}}, "killed.yaml")
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(killed), "after-rename", "2"], cwd=ROOT,
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    logs: list[str] = []
    run_merge(load_config(killed), show_progress=False, log=logs.append)
    assert [line for line in logs if line.startswith("resuming")] == [
        f"resuming {tmp_path / 'out'}: 1 of {len(list((tmp_path / 'reference').glob('model-*.safetensors')))} shards "
        "already complete and verified"]
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "reference")
