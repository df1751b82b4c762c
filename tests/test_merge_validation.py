"""Bad inputs are refused before anything is written, with a message naming the key, file or tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from merge_fixtures import raw_checkpoint, write_config
from safetensors.torch import save_file

from launcher.cli import main as calm
from merge.job import run_merge
from merge.merge_config import load_config, validate_config
from merge.merge_errors import (
    CheckpointError,
    ConfigError,
    ExamplesError,
    IncompatibleInputsError,
    MergeError,
    OutputError,
)

SHAPES = {"a.weight": (4, 4), "b.weight": (4,)}


def tensors(seed: int = 0, **changes) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=generator).to(torch.bfloat16) for n, s in SHAPES.items()}
    return {**base, **changes}


@pytest.fixture
def two(tmp_path):
    """Two compatible checkpoints, m0 and m1; returns a config dict merging them into tmp/out."""
    raw_checkpoint(tmp_path / "m0", tensors(0))
    raw_checkpoint(tmp_path / "m1", tensors(1), shards=2)
    return {
        "method": "linear",
        "models": [{"path": str(tmp_path / "m0")}, {"path": str(tmp_path / "m1")}],
        "output": {"path": str(tmp_path / "out")},
    }


def refused(cfg: dict, error: type[MergeError], *fragments: str) -> str:
    """Run the merge, expect `error` with every fragment in its message and no output folder left."""
    with pytest.raises(error) as caught:
        run_merge(validate_config(cfg), show_progress=False, log=lambda _: None)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not Path(cfg["output"]["path"]).exists(), "something was written"
    return message


# --- config ---------------------------------------------------------------------------------------


def test_unknown_key_names_its_path(two):
    two["output"]["shard_sise"] = "1GB"
    refused(two, ConfigError, "output.shard_sise", "Extra inputs are not permitted")


def test_wrong_type_names_its_path(two):
    two["weights"] = ["heavy", 1.0]
    refused(two, ConfigError, "weights[0]", "valid number")


def test_non_finite_weight(two):
    two["weights"] = [1.0, float("nan")]
    refused(two, ConfigError, "weights[1]", "finite number")


def test_weight_count(two):
    two["weights"] = [0.2, 0.3, 0.5]
    refused(two, ConfigError, "weights: 3 given, linear needs 2 (one per model)")


def test_override_weight_count(two):
    two["overrides"] = [{"pattern": "a.*", "weights": [1.0]}]
    refused(two, ConfigError, "overrides[0].weights: 1 given")


def test_unknown_method(two):
    two["method"] = "average"
    refused(two, ConfigError, "method: unknown method 'average'", "linear", "ties")


def test_method_parameter_out_of_range(two):
    two |= {"method": "ties", "base_model": "m0", "parameters": {"density": 1.5}}
    refused(two, ConfigError, "parameters.density", "less than or equal to 1")


def test_method_parameter_unknown(two):
    two |= {"method": "slerp", "parameters": {"t": 0.5, "tt": 1}}
    refused(two, ConfigError, "parameters.tt", "Extra inputs")


def test_unknown_base_model(two):
    two |= {"method": "task_arithmetic", "base_model": "m9"}
    refused(two, ConfigError, "base_model: no model named 'm9'", "m0, m1")


def test_duplicate_model_names(two):
    two["models"][1]["name"] = "m0"
    refused(two, ConfigError, "models[1].name: 'm0' is used twice")


def test_slerp_takes_no_weights(two):
    two |= {"method": "slerp", "parameters": {"t": 0.5}, "weights": [0.5]}
    refused(two, ConfigError, "weights: slerp takes no weights")


def test_override_matching_nothing(two):
    two["overrides"] = [{"pattern": "lm_head.*", "weights": [1, 0]}]
    refused(two, ConfigError, "overrides[0].pattern: 'lm_head.*' matches no")


def test_memory_budget_too_small(two):
    two["memory_budget"] = "100MB"
    refused(two, ConfigError, "memory_budget: 100000000 bytes is too small")


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: linear\nmodels: [\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_config(path)


# --- checkpoints ----------------------------------------------------------------------------------


def test_missing_model_folder(two, tmp_path):
    two["models"][1]["path"] = str(tmp_path / "nowhere")
    refused(two, CheckpointError, "model 'nowhere'", "is not a folder")


def test_folder_without_safetensors(two, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    two["models"][1]["path"] = str(tmp_path / "bin")
    refused(two, CheckpointError, "no model.safetensors or model.safetensors.index.json", "pytorch_model.bin")


def test_corrupt_header(two, tmp_path):
    path = tmp_path / "m0" / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 64)
    refused(two, CheckpointError, str(path), "corrupt header: not valid JSON")


def test_truncated_file(two, tmp_path):
    path = tmp_path / "m0" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    refused(two, CheckpointError, str(path),
            "truncated, an unfinished download?: its tensors need 40 bytes of data after the header, the file holds 30")


def test_gaps_and_trailing_bytes(two, tmp_path):
    """As the safetensors library, the tensors must tile the data section exactly, up to the file's end."""
    path = tmp_path / "m0" / "model.safetensors"
    original = path.read_bytes()
    path.write_bytes(original + b"\0" * 3)
    refused(two, CheckpointError, str(path), "trailing bytes: its tensors need 40 bytes of data after the header, "
                                             "the file holds 43")
    header = json.dumps({
        "a.weight": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]},
        "b.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [40, 48]},
    }).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 48)
    refused(two, CheckpointError, str(path), "a gap before tensor 'b.weight' ('b.weight' starts at data byte 40, expected 32)")


def test_a_header_error_keeps_file_and_problem_apart():
    """The training preflight words header errors its own way around the same two parts."""
    import pickle

    from merge.merge_errors import HeaderError

    error = pickle.loads(pickle.dumps(HeaderError("/m/model.safetensors", "trailing bytes: ...")))
    assert (error.path, error.problem, str(error)) == (
        "/m/model.safetensors", "trailing bytes: ...", "/m/model.safetensors: trailing bytes: ...")
    assert isinstance(error, CheckpointError)


def test_header_length_beyond_the_file(two, tmp_path):
    path = tmp_path / "m0" / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    refused(two, CheckpointError, str(path), "truncated or not a safetensors file")


def test_overlapping_tensors(two, tmp_path):
    path = tmp_path / "m0" / "model.safetensors"
    header = json.dumps({
        "a.weight": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 32]},
        "b.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    }).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    refused(two, CheckpointError, str(path), "tensors 'a.weight' and 'b.weight' overlap")


def test_offsets_disagree_with_shape(two, tmp_path):
    path = tmp_path / "m0" / "model.safetensors"
    header = json.dumps({"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    refused(two, CheckpointError, "tensor 'a.weight': data_offsets span 32 bytes but shape [4, 4] of F32 needs 64")


def test_unsupported_dtype(two, tmp_path):
    path = tmp_path / "m0" / "model.safetensors"
    header = json.dumps({"a.weight": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    refused(two, CheckpointError, "tensor 'a.weight': unsupported dtype 'F8_E4M3'")


def test_index_lists_a_missing_shard(two, tmp_path):
    (tmp_path / "m1" / "model-00002-of-00002.safetensors").unlink()
    refused(two, CheckpointError,
            "model.safetensors.index.json names model-00002-of-00002.safetensors, which is missing (an unfinished download?)")


# --- inputs against each other --------------------------------------------------------------------


def test_missing_tensor(two, tmp_path):
    raw_checkpoint(tmp_path / "m1", {"a.weight": tensors(1)["a.weight"]})
    (tmp_path / "m1" / "model.safetensors.index.json").unlink()
    refused(two, IncompatibleInputsError, "tensor 'b.weight' is in model 'm0' but not in model 'm1'")


def test_shape_mismatch(two, tmp_path):
    raw_checkpoint(tmp_path / "m1", tensors(1, **{"a.weight": torch.zeros(4, 5, dtype=torch.bfloat16)}))
    (tmp_path / "m1" / "model.safetensors.index.json").unlink()
    refused(two, IncompatibleInputsError, "tensor 'a.weight' has shape [4, 4] in model 'm0' but [4, 5] in model 'm1'")


def test_vocabulary_mismatch_needs_a_policy(two, tmp_path):
    for name, vocab in (("m0", 4), ("m1", 5)):
        raw_checkpoint(tmp_path / name, tensors(1, **{"a.weight": torch.zeros(vocab, 4, dtype=torch.bfloat16)}), config={"vocab_size": vocab})
    (tmp_path / "m1" / "model.safetensors.index.json").unlink()
    refused(two, IncompatibleInputsError, "tensor 'a.weight': vocabulary sizes differ (m0: 4, m1: 5)", "vocab_policy: truncate")


def test_float_and_integer_tensors(two, tmp_path):
    raw_checkpoint(tmp_path / "m1", tensors(1, **{"b.weight": torch.zeros(4, dtype=torch.int64)}))
    (tmp_path / "m1" / "model.safetensors.index.json").unlink()
    refused(two, IncompatibleInputsError, "tensor 'b.weight' is BF16 in model 'm0' but I64 in model 'm1'")


def test_float_dtypes_differ_without_an_output_dtype(two, tmp_path):
    raw_checkpoint(tmp_path / "m1", {n: t.float() for n, t in tensors(1).items()})
    (tmp_path / "m1" / "model.safetensors.index.json").unlink()
    refused(two, IncompatibleInputsError, "tensor 'a.weight': the inputs' dtypes differ (m0: BF16, m1: F32)", "output.dtype")


# --- output folder and examples -------------------------------------------------------------------


def test_output_is_an_input(two, tmp_path):
    two["output"]["path"] = str(tmp_path / "m1")
    before = sorted(p.name for p in (tmp_path / "m1").iterdir())
    with pytest.raises(OutputError, match="the output folder is inside input model 'm1'"):
        run_merge(validate_config(two), show_progress=False)
    assert sorted(p.name for p in (tmp_path / "m1").iterdir()) == before


def test_output_not_empty(two, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty and holds no merge_manifest.json"):
        run_merge(validate_config(two), show_progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_output_holds_a_different_merge(two, tmp_path):
    run_merge(validate_config(two), show_progress=False, log=lambda _: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    two["weights"] = [0.9, 0.1]
    with pytest.raises(OutputError, match="holds a different merge"):
        run_merge(validate_config(two), show_progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_malformed_examples_line(two, tmp_path):
    examples = tmp_path / "examples.jsonl"
    examples.write_text('{"input": "a", "output": "b"}\n{"input": "a", "answer": "b"}\n')
    two["weights_from_examples"] = {"examples": str(examples)}
    refused(two, ExamplesError, f"{examples}:2: each line needs string fields 'input' and 'output'")


def test_cli_prints_one_line_and_exits_2(two, tmp_path, capsys):
    two["weights"] = [1.0]
    config = write_config(tmp_path, two)
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", str(config), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"calm merge: error: {config}: weights: 1 given, linear needs 2 (one per model)"]
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_in_index_folder_is_named(two, tmp_path):
    """A shard the index lists but which holds other tensors than the index says."""
    save_file({"x": torch.zeros(2)}, str(tmp_path / "m1" / "model-00002-of-00002.safetensors"))
    refused(two, CheckpointError, "model-00002-of-00002.safetensors: holds 'x'")


def test_negative_linear_weights_need_to_be_asked_for(two, tmp_path):
    two["weights"] = [-0.5, 1.5]
    refused(two, ConfigError, "weights: model 'm0' has a negative weight (-0.5)", "parameters.allow_negative_weights: true")
    two["parameters"] = {"allow_negative_weights": True}
    run_merge(validate_config(two), show_progress=False, log=lambda _: None)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_negative_override_weights_name_the_override(two):
    two["overrides"] = [{"pattern": "*", "weights": [1.0, -0.25]}]
    refused(two, ConfigError, "overrides[0].weights: model 'm1'", "overrides[0].parameters.allow_negative_weights")


def test_negative_task_vector_weights_are_allowed(two, tmp_path):
    two |= {"method": "task_arithmetic", "base_model": "m0", "weights": [-1.0]}
    run_merge(validate_config(two), show_progress=False, log=lambda _: None)
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_unwritable_output_is_one_line_and_exit_2(two, tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    out = "/proc/calm-merge-out" if where == "proc" else str(tmp_path / "file" / "out")
    two["output"]["path"] = out
    config = write_config(tmp_path, two)
    with pytest.raises(SystemExit) as exit_:
        calm(["merge", str(config), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"calm merge: error: {out}: cannot be created"), err


def test_a_write_that_fails_anyway_is_one_line(two, tmp_path, monkeypatch):
    """What access() cannot see (root on a read-only mount, a full disk): the write itself is guarded."""
    import merge.io.manifest

    def refuse(path, data):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(merge.io.manifest, "write_atomic", refuse)
    with pytest.raises(OutputError, match=r"merge_manifest.json: cannot write: Read-only file system"):
        run_merge(validate_config(two), show_progress=False, log=lambda _: None)
