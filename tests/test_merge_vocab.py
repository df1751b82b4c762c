"""Merging models whose vocabularies differ (`tokenizer:`): against mergekit 0.1.5's own outputs
(tests/fixtures/mergekit/vocab/, made by make_vocab_fixtures.py) where its semantics are ours, and
against an exact reference built here token by token where they are not; refusals without a setting.

mergekit and calm-dist agree on: a token every model has (the method over all), a token one model
has (that model's row), tokens_default mean without a base and base with one (mergekit's fills).
They differ where a union token is in some models but not all (more than one): mergekit fills the
others' rows (base's row or mean) and merges over every model; calm-dist merges over only the models
that have the token; and in the ids of the tokens a union adds (mergekit's follow Rust hash-map order,
calm-dist's the models' id order), so rows are compared by token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_fixtures import exact_linear_bf16, read_merged
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from calm_dist.testing.tiny_checkpoints import tiny_llama
from launcher.plan.command import merge_setup
from merge.job import run_merge
from merge.merge_config import validate_config
from merge.merge_errors import ConfigError, IncompatibleInputsError
from merge.planning.memory import merge_terms

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit" / "vocab"
CASES = json.loads((FIXTURES / "cases.json").read_text())
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TOKENS = {  # make_vocab_fixtures.TOKENS
    "v0": ["<unk>", "<s>", "</s>", *"abcdefghij"],
    "v1": ["<unk>", "<s>", "</s>", "b", "a", "x", "c", "d", "e", "f", "y", "g", "h", "z"],
    "v2": ["<unk>", "<s>", "</s>", "a", "c", "w", "e", "g", "i", "x"],
}


def merge(out: Path, names: list[str], dtype: str = "float32", **settings) -> dict[str, torch.Tensor]:
    raw = {"method": "linear", "models": [{"path": str(FIXTURES / "inputs" / n)} for n in names],
           "output": {"path": str(out), "dtype": dtype}, **settings}
    run_merge(validate_config(raw), show_progress=False, log=lambda _: None)
    return read_merged(out)


def merge_case(case: dict, out: Path, dtype: str) -> dict[str, torch.Tensor]:
    settings = {"method": case["method"], "tokenizer": case["tokenizer"]}
    settings |= {"base_model": case["base_model"]} if case["base_model"] else {}
    settings |= {"weights": case["weights"]} if case["weights"] else {}
    return merge(out, case["models"], dtype, **settings)


def by_token(tensors: dict[str, torch.Tensor], vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """Vocabulary tensors with their rows in token order (the other tensors as they are)."""
    order = sorted(vocab)
    return {name: torch.stack([t[vocab[token]] for token in order]) if name in VOCAB_TENSORS else t
            for name, t in tensors.items()}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return (a.view(bits).long() - b.view(bits).long()).abs()


def test_union_linear_matches_mergekit_bitwise(tmp_path):
    """Two models, weights 0.5/0.5: mergekit's fp32 sum rounds once, as calm-dist's exact merge."""
    case = CASES["union_linear"]
    ours = merge_case(case, tmp_path / "out", "float32")
    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert vocab == {t: i for i, t in enumerate(TOKENS["v0"] + ["x", "y", "z"])}  # v0's ids, then v1's new ones
    assert vocab.keys() == case["vocab"].keys()
    reference = by_token(load_file(str(FIXTURES / "union_linear.safetensors")), case["vocab"])
    ours = by_token(ours, vocab)
    assert ours.keys() == reference.keys()
    for name, expected in reference.items():
        assert torch.equal(ours[name], expected), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 16 and ours["lm_head.weight"].shape == (16, 16)


@pytest.mark.parametrize("name", ["union_linear_weighted", "base_linear_mean", "base_task_arithmetic"])
def test_matches_mergekit_within_one_ulp(name, tmp_path):
    """mergekit rounds each product and sum in fp32, calm-dist once: within a few fp32 ulps of the
    tensor's largest value, and one bf16 ulp after rounding."""
    case = CASES[name]
    reference = by_token(load_file(str(FIXTURES / f"{name}.safetensors")), case["vocab"])
    ours32 = merge_case(case, tmp_path / "fp32", "float32")
    ours16 = merge_case(case, tmp_path / "bf16", "bfloat16")
    vocab = AutoTokenizer.from_pretrained(tmp_path / "fp32").get_vocab()
    assert vocab.keys() == case["vocab"].keys()
    if case["tokenizer"]["source"] == "base":
        assert vocab == case["vocab"] == {t: i for i, t in enumerate(TOKENS["v0"])}
        for file in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / "fp32" / file).read_bytes() == (FIXTURES / "inputs" / "v0" / file).read_bytes()
    ours32, ours16 = by_token(ours32, vocab), by_token(ours16, vocab)
    assert ours32.keys() == reference.keys() == ours16.keys()
    for tensor, expected in reference.items():
        assert (ours32[tensor] - expected).abs().max() <= 2**-21 * expected.abs().max(), tensor
        assert int(ulps(ours16[tensor], expected.to(torch.bfloat16)).max()) <= 1, tensor


def test_union_of_three_merges_each_token_over_the_models_that_have_it(tmp_path):
    """Exact reference, token by token: the linear formula over the models holding it, rounded once."""
    weights = [0.5, 0.3, 0.2]
    ours = merge(tmp_path / "out", ["v0", "v1", "v2"], "bfloat16", weights=weights, tokenizer={"source": "union"})
    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    # v0's ids, then v1's new tokens in v1's id order, then v2's.
    assert vocab == {t: i for i, t in enumerate(TOKENS["v0"] + ["x", "y", "z", "w"])}
    inputs = {n: load_file(str(FIXTURES / "inputs" / n / "model.safetensors")) for n in TOKENS}
    for tensor in VOCAB_TENSORS:
        for token, row in vocab.items():
            holders = [(i, n) for i, n in enumerate(TOKENS) if token in TOKENS[n]]
            rows = [inputs[n][tensor][TOKENS[n].index(token)] for _, n in holders]
            expected = exact_linear_bf16(rows, [weights[i] for i, _ in holders])
            assert torch.equal(ours[tensor][row], expected), (tensor, token)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())["tokenizer"]
    assert report == {"source": "union", "tokens_default": None, "rows": 17, "added_tokens": 4, "inputs": {
        "v0": {"tokens": 13, "lacking": 4, "left_out": 0}, "v1": {"tokens": 14, "lacking": 3, "left_out": 0},
        "v2": {"tokens": 10, "lacking": 7, "left_out": 0}}}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == 17


@pytest.mark.parametrize("default", ["zero", "mean", "base"])
def test_a_models_tokenizer_with_each_default(default, tmp_path):
    """source v1: v1's tokenizer and ids; v0 and v2 contribute `default` for the tokens they lack."""
    weights = [0.5, 0.25, 0.25]
    settings = {"weights": weights, "tokenizer": {"source": "v1", "tokens_default": default}}
    if default == "base":  # v0, the first model, lacks v1's x, y, z: refused, naming it
        with pytest.raises(ConfigError, match="tokens_default: base takes rows from 'v0', which lacks 3 token"):
            merge(tmp_path / "out", ["v0", "v1", "v2"], **settings)
        assert not (tmp_path / "out").exists()
        return
    ours = merge(tmp_path / "out", ["v0", "v1", "v2"], **settings)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (FIXTURES / "inputs" / "v1" / "tokenizer.json").read_bytes()
    inputs = {n: load_file(str(FIXTURES / "inputs" / n / "model.safetensors")) for n in TOKENS}
    for tensor in VOCAB_TENSORS:
        for row, token in enumerate(TOKENS["v1"]):
            have = [inputs[n][tensor][TOKENS[n].index(token)].double() for n in TOKENS if token in TOKENS[n]]
            fill = sum(have) / len(have) if default == "mean" else torch.zeros(16, dtype=torch.float64)
            fill = fill.float().double()  # the mean is taken in fp32 (sum in model order, one division)
            rows = [inputs[n][tensor][TOKENS[n].index(token)].double() if token in TOKENS[n] else fill for n in TOKENS]
            expected = sum(w * r for w, r in zip(weights, rows, strict=True)).float()
            assert (ours[tensor][row] - expected).abs().max() <= 2**-22 * expected.abs().max(), (tensor, token)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(TOKENS["v1"])


def word_tokenizer(folder: Path, tokens: list[str]) -> None:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def test_same_row_counts_but_different_tokenizers_are_refused(tmp_path):
    for name, tokens in (("p", ["<unk>", "a", "b", "c"]), ("q", ["<unk>", "b", "a", "c"])):
        shutil.copytree(FIXTURES / "inputs" / "v0", tmp_path / name)
        for stale in (tmp_path / name).glob("tokenizer*"):
            stale.unlink()
        word_tokenizer(tmp_path / name, tokens)
    raw = {"method": "linear", "models": [{"path": str(tmp_path / "p")}, {"path": str(tmp_path / "q")}],
           "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(IncompatibleInputsError) as caught:
        run_merge(validate_config(raw), show_progress=False, log=lambda _: None)
    assert str(caught.value).startswith("tokenizers differ: models 'p' and 'q' give different vocabularies "
                                        "(tokens: p: 4, q: 4; e.g. 'a'), so their embedding rows do not match")
    assert not (tmp_path / "out").exists()


def test_different_row_counts_are_refused_naming_the_settings(tmp_path):
    with pytest.raises(IncompatibleInputsError) as caught:
        merge(tmp_path / "out", ["v0", "v1"])
    message = str(caught.value)
    assert "vocabulary sizes differ (v0: 13, v1: 14)" in message
    assert "tokenizer: {source: union}" in message and "vocab_policy: truncate" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("tokenizer", "extra", "fragment"), [
    ({"source": "union", "tokens_default": "zero"}, {}, "tokenizer.tokens_default: source union merges each token"),
    ({"source": "base"}, {}, "tokenizer.tokens_default: say which row"),
    ({"source": "v9", "tokens_default": "zero"}, {}, "tokenizer.source: 'v9' is not 'union', 'base' or a model's name"),
    ({"source": "union"}, {"vocab_policy": "truncate"}, "tokenizer: vocab_policy: truncate and tokenizer are two ways"),
    ({"source": "union"}, {"output": {"path": "o", "copy_files_from": "v1"}}, "output.copy_files_from: with tokenizer"),
])
def test_tokenizer_config_errors(tokenizer, extra, fragment):
    raw = {"method": "linear", "models": [{"path": "v0"}, {"path": "v1"}], "output": {"path": "o"},
           "tokenizer": tokenizer, **extra}
    with pytest.raises(ConfigError, match="config: " + fragment.replace("(", r"\(").replace("{", r"\{")):
        validate_config(raw)


def test_union_a_method_cannot_take_is_refused(tmp_path):
    """nuslerp merges exactly two models: tokens only two of three share leave it one."""
    with pytest.raises(ConfigError, match=r"the tokens only 'v0', 'v1' have \(e.g. row 4\) would need nuslerp to merge 1 model"):
        merge(tmp_path / "out", ["v0", "v1", "v2"], method="nuslerp", base_model="v0", weights=[0.5, 0.5],
              tokenizer={"source": "union"})


def test_tied_models_with_different_vocabularies_stay_tied(tmp_path):
    first = tiny_llama(tmp_path / "t0", seed=40, tie=True, dtype=torch.float32)
    second = tiny_llama(tmp_path / "t1", seed=41, tie=True, dtype=torch.float32, vocab=100)
    extra = AutoTokenizer.from_pretrained(tmp_path / "t1")
    extra.add_tokens(["<new1>", "<new2>"])  # ids 98, 99: t1's two extra rows
    extra.save_pretrained(tmp_path / "t1")
    out = tmp_path / "out"
    merged = merge(out, [], weights=[0.5, 0.5], tokenizer={"source": "union"},
                   models=[{"path": str(tmp_path / "t0")}, {"path": str(tmp_path / "t1")}])
    assert "lm_head.weight" not in merged and merged["model.embed_tokens.weight"].shape == (100, 32)
    embed0, embed1 = first.model.embed_tokens.weight.data, second.model.embed_tokens.weight.data
    assert torch.equal(merged["model.embed_tokens.weight"][:98], (embed0 * 0.5 + embed1[:98] * 0.5))
    assert torch.equal(merged["model.embed_tokens.weight"][98:], embed1[98:])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.tie_word_embeddings and loaded.config.vocab_size == 100
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["<new1>", "<new2>"]) == [98, 99]


def test_plan_counts_the_whole_vocabulary_tensor(tmp_path):
    cfg = validate_config({"method": "linear", "tokenizer": {"source": "union"}, "output": {"path": str(tmp_path / "o")},
                           "models": [{"path": str(FIXTURES / "inputs" / n)} for n in ("v0", "v1", "v2")]})
    setup, _ = merge_setup(cfg)
    # inputs 13 + 14 + 10 rows, 4 gathered copies and the result in fp32 of 17 rows, the output's (fp32) 17.
    assert setup.remap_bytes == (37 + 4 * 17 + 17) * 16 * 4
    terms = {t.name: t.bytes for t in merge_terms(setup).terms}
    assert terms["vocabulary tensor, whole"] == setup.remap_bytes
