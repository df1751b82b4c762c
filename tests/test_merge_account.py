"""Every input tensor is accounted for: merged, copied, or left out by a rule the config states
(`drop:`, tied embeddings), listed in merge_report.json and by `calm merge --verify`; a tensor some
inputs lack, with no rule, is refused before any work, naming it."""

from __future__ import annotations

import json

import pytest
import torch
from merge_fixtures import raw_checkpoint, read_merged
from safetensors.torch import save_file

from launcher.cli import main as calm
from merge.io.manifest import verify
from merge.job import run_merge
from merge.merge_config import validate_config
from merge.merge_errors import ConfigError, IncompatibleInputsError

TIE = {"model_type": "llama", "tie_word_embeddings": True}


def tensors(seed: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=generator), "b.weight": torch.randn(5, generator=generator),
            "step": torch.tensor([seed], dtype=torch.int64), **extra}


def run(tmp_path, **settings) -> dict:
    raw = {"method": "linear", "models": [{"path": str(tmp_path / f"m{i}")} for i in range(2)],
           "output": {"path": str(tmp_path / "out")}, **settings}
    run_merge(validate_config(raw), show_progress=False, log=lambda _: None)
    return json.loads((tmp_path / "out" / "merge_report.json").read_text())


def test_tensors_some_inputs_lack_are_refused_all_named(tmp_path):
    raw_checkpoint(tmp_path / "m0", tensors(0, **{"head.weight": torch.ones(2), "head.bias": torch.ones(2)}))
    raw_checkpoint(tmp_path / "m1", tensors(1, **{"extra": torch.ones(3)}))
    with pytest.raises(IncompatibleInputsError) as caught:
        run(tmp_path)
    assert str(caught.value) == (
        "tensor 'head.bias' is in model 'm0' but not in model 'm1'; tensor 'head.weight' is in model 'm0' but not in "
        "model 'm1'; tensor 'extra' is in model 'm1' but not in model 'm0'. A merge leaves an input tensor out only "
        "by a rule: add patterns matching them to drop: to leave them out of the output")
    assert not (tmp_path / "out").exists()


def test_dropped_tensors_are_left_out_and_reported(tmp_path):
    raw_checkpoint(tmp_path / "m0", tensors(0, **{"head.weight": torch.ones(2), "head.bias": torch.ones(2)}))
    raw_checkpoint(tmp_path / "m1", tensors(1, **{"extra": torch.ones(3)}))
    report = run(tmp_path, drop=["head.*", "extra"])
    assert set(read_merged(tmp_path / "out")) == {"a.weight", "b.weight", "step"}
    assert report["drop"] == ["head.*", "extra"]
    assert sorted(report["dropped"], key=lambda d: d["tensor"]) == [
        {"tensor": "extra", "models": ["m1"], "rule": "drop[1]: 'extra'"},
        {"tensor": "head.bias", "models": ["m0"], "rule": "drop[0]: 'head.*'"},
        {"tensor": "head.weight", "models": ["m0"], "rule": "drop[0]: 'head.*'"},
    ]
    # The integer tensor is copied from the first model; the second's is not used.
    assert report["tensors"] == {"m0": {"merged": 2, "copied": 1, "not_used": 0, "dropped": 2},
                                 "m1": {"merged": 2, "copied": 0, "not_used": 1, "dropped": 1}}
    assert verify(tmp_path / "out") == []


def test_a_drop_pattern_matching_nothing_is_refused(tmp_path):
    raw_checkpoint(tmp_path / "m0", tensors(0))
    raw_checkpoint(tmp_path / "m1", tensors(1))
    with pytest.raises(ConfigError, match=r"^drop\[1\]: 'lm_head\.\*' matches no tensor of any input$"):
        run(tmp_path, drop=["step", "lm_head.*"])
    assert not (tmp_path / "out").exists()


def test_a_stored_output_embedding_of_tied_inputs_is_dropped_by_the_tie_rule(tmp_path):
    for i in range(2):
        embed = torch.randn(6, 3, generator=torch.Generator().manual_seed(i))
        raw_checkpoint(tmp_path / f"m{i}", {"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone()}, TIE)
    report = run(tmp_path)
    assert set(read_merged(tmp_path / "out")) == {"model.embed_tokens.weight"}
    assert report["dropped"] == [{"tensor": "lm_head.weight", "models": ["m0", "m1"],
                                  "rule": "tied embeddings: every input ties it to its input embedding, and so does the output"}]


def test_verify_lists_dropped_tensors_and_finds_unaccounted_ones(tmp_path, capsys):
    raw_checkpoint(tmp_path / "m0", tensors(0, **{"head.weight": torch.ones(2)}))
    raw_checkpoint(tmp_path / "m1", tensors(1))
    run(tmp_path, drop=["head.weight"])
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", "--verify", str(tmp_path / "out")])
    assert exit_.value.code == 0
    out = tmp_path / "out"
    assert capsys.readouterr().out.splitlines() == [f"{out}: dropped 'head.weight' of m0: drop[0]: 'head.weight'", f"{out}: OK"]
    # An input that has gained a tensor since: the output does not account for it.
    save_file(tensors(1, **{"new": torch.ones(1)}), str(tmp_path / "m1" / "model.safetensors"))
    assert verify(out) == ["input 'm1' tensor 'new': not in the output, and no rule of the merge drops it"]
