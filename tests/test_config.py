"""The training config: every rejection names the file and the key, and paths resolve against the file."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.train_config import ConfigError, TrainConfig, load_config

BASE = {
    "name": "tiny",
    "models": {"anchor": {"path": "models/anchor"}, "augmenting": [{"path": "models/aug"}]},
    "data": {"train": "data/train.jsonl", "text_field": "text"},
    "training": {"steps": 10, "micro_batch_size": 2, "global_batch_size": 8},
}


def write(tmp_path: Path, changes: dict | None = None, name: str = "config.yaml") -> Path:
    """BASE with `changes` ({"training.steps": 5}; a value of None deletes the key) written as YAML."""
    raw = copy.deepcopy(BASE)
    for dotted, value in (changes or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def rejection(path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_a_minimal_config_gets_the_documented_defaults(tmp_path):
    config = load_config(write(tmp_path))
    assert config.composition.every_n == 4 and config.composition.connections is None
    assert config.deepspeed.zero_stage == 3 and config.placement.mode == "colocated"
    assert config.ray.address is None and config.ray.num_workers == 2
    assert config.gradient_accumulation_steps == 2  # 8 / (2 x 2)


def test_relative_paths_resolve_against_the_config_folder_not_the_working_directory(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "project", {
        "models.tokenizer": "tok",
        "data.eval": "~/eval.jsonl",
        "ray.storage_path": "s3://bucket/runs",
        "output_dir": "/abs/out",
    }, name="configs/run.yaml")
    config = load_config(path)
    folder = tmp_path / "project" / "configs"
    assert config.models.anchor.path == str(folder / "models" / "anchor")
    assert config.models.augmenting[0].path == str(folder / "models" / "aug")
    assert config.models.tokenizer == str(folder / "tok")
    assert config.data.train == str(folder / "data" / "train.jsonl")
    assert config.data.eval == str(tmp_path / "home" / "eval.jsonl")
    assert config.ray.storage_path == "s3://bucket/runs"  # a URI is left alone
    assert config.output_dir == "/abs/out"


def test_an_unknown_key_at_depth_is_named_with_its_dotted_path(tmp_path):
    path = write(tmp_path, {"training.micro_batch_siz": 2})
    message = rejection(path)
    assert message.startswith(f"{path}: invalid config")
    assert "  training.micro_batch_siz: Extra inputs are not permitted" in message


def test_a_wrong_type_names_the_key(tmp_path):
    message = rejection(write(tmp_path, {"training.steps": "many"}))
    assert "  training.steps: Input should be a valid integer" in message
    message = rejection(write(tmp_path, {"models.augmenting": [{"path": "a", "dtype": "int8"}]}))
    assert "  models.augmenting.0.dtype: Input should be 'float32' or 'bfloat16'" in message


def test_every_n_and_connections_together_are_refused(tmp_path):
    message = rejection(write(tmp_path, {"composition.every_n": 2, "composition.connections": [[0, 1, 1]]}))
    assert "  composition: give either every_n or connections, not both" in message


def test_connections_alone_or_with_every_n_null_are_accepted(tmp_path):
    config = load_config(write(tmp_path, {"composition.connections": [[0, 1, 3]]}))
    assert config.composition.connections == [(0, 1, 3)]
    config = load_config(write(tmp_path, {"composition": {"every_n": None, "connections": [[0, 1, 3]]}}))
    assert config.composition.connections == [(0, 1, 3)]


@pytest.mark.parametrize("composition", [{"connections": [[0, 1, -1], [0, 1, 3]]}, {"every_n": 2}, {}])
def test_a_validated_config_survives_the_trip_to_the_workers(tmp_path, composition):
    """Workers receive config.model_dump() and validate it again: it must give the same config."""
    config = load_config(write(tmp_path, {"composition": composition}))
    assert TrainConfig.model_validate(config.model_dump(mode="json")) == config


def test_neither_every_n_nor_connections_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "composition": {"every_n": None}}))
    assert "  composition: give every_n or connections" in rejection(path)


def test_text_field_and_prompt_field_together_are_refused(tmp_path):
    message = rejection(write(tmp_path, {"data.prompt_field": "q", "data.completion_field": "a"}))
    assert "  data: give text_field, or prompt_field and completion_field, not both" in message


def test_a_prompt_field_needs_its_completion_field(tmp_path):
    message = rejection(write(tmp_path, {"data.text_field": None, "data.prompt_field": "q"}))
    assert "  data: give text_field, or both prompt_field and completion_field" in message


def test_batch_sizes_that_do_not_divide_show_the_arithmetic(tmp_path):
    message = rejection(write(tmp_path, {"training.global_batch_size": 10, "ray.num_workers": 2}))
    assert message.splitlines()[1] == (
        "  training.global_batch_size=10 is not a multiple of training.micro_batch_size x ray.num_workers"
        " = 2 x 2 = 4"
    )


def test_latest_is_refused_as_a_name(tmp_path):
    assert "  name: 'latest' is reserved" in rejection(write(tmp_path, {"name": "latest"}))
    assert "  name: String should match pattern" in rejection(write(tmp_path, {"name": "a/b"}))


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    assert rejection(path) == f"{path}: config file not found"


def test_a_folder_given_as_the_config_is_named(tmp_path):
    assert rejection(tmp_path).startswith(f"{tmp_path}: cannot read the config file")


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodels: [unclosed\n")
    assert rejection(path).startswith(f"{path}: not valid YAML")


def test_a_top_level_list_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n")
    assert rejection(path) == f"{path}: expected a mapping of keys at the top level"


def test_overrides_set_dotted_keys_even_under_an_empty_section(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE) + "ray:\n")  # `ray:` left empty: None in YAML
    config = load_config(path, {"ray.address": "http://head:8265"})
    assert config.ray.address == "http://head:8265"


def test_an_override_below_a_scalar_names_the_key(tmp_path):
    path = write(tmp_path, {"ray": 5})
    assert rejection(path, {"ray.address": "x:1"}) == f"{path}: cannot set ray.address: ray is not a mapping"


def test_a_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    path = write(tmp_path, {})
    message = rejection(path, {"training.steps": "many"})
    assert "  training.steps (from --set training.steps=many on the command line): Input should be a valid integer" in (
        message)
    # A cross-key rule broken by an override names the override too.
    message = rejection(path, {"training.micro_batch_size": 3})
    assert "(from --set training.micro_batch_size=3 on the command line)" in message
    # A key from the file stays the file's.
    assert "command line" not in rejection(write(tmp_path, {"training.steps": "many"}))


def test_preflight_problems_with_an_overridden_key_name_the_override(tmp_path):
    from launcher.train_config import blamed_on_command_line

    with pytest.raises(ConfigError) as info, blamed_on_command_line({"data.train": "/nope.jsonl"}):
        raise ConfigError("data.train: /nope.jsonl: no such file or folder")
    assert str(info.value) == ("data.train (from --set data.train=/nope.jsonl on the command line): /nope.jsonl: no "
                               "such file or folder")
    with pytest.raises(ConfigError) as info, blamed_on_command_line({"data": {"train": "x"}}):
        raise ConfigError("data.train: x: no such file or folder")
    assert str(info.value).startswith("data.train (from --set data={train: x} on the command line): ")
    with pytest.raises(ConfigError, match="^models.anchor.path: gone$"), blamed_on_command_line({"data.train": "x"}):
        raise ConfigError("models.anchor.path: gone")


def test_the_cli_parser_imports_no_heavy_library():
    """`calm --help` stays instant (0.2 s, against 1.9 s when a subcommand's arguments imported torch)."""
    code = (
        "import sys; from launcher.cli import build_parser; build_parser(); "
        "print([m for m in ('torch', 'ray', 'deepspeed', 'transformers', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


def test_a_subcommands_parser_imports_only_its_own_module():
    """`calm merge ...` builds only merge's arguments: the training side's modules (launcher.train_config and
    its pydantic models, 0.3 s) stay unimported, so the merge starts reading its inputs sooner."""
    code = (
        "import sys; from launcher.cli import build_parser; "
        "args = build_parser('merge').parse_args(['merge', 'x.yaml', '--workers', '2']); "
        "print(args.workers, [m for m in ('launcher.train_config', 'launcher.train.command', 'pydantic') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "2 []"


def test_the_config_offers_exactly_the_composition_options_and_hands_them_over():
    import torch

    from calm_dist.model.options import CompositionOptions
    from launcher.train_config import CompositionConfig

    layout = {"every_n", "connections"}
    assert set(CompositionConfig.model_fields) - layout == set(CompositionOptions.names())
    options = CompositionConfig(num_heads=8, recency_bias=True, dropout=0.25, dtype="bfloat16").options()
    assert options == CompositionOptions(num_heads=8, dtype=torch.bfloat16, recency_bias=True, dropout=0.25)


def test_float16_is_refused_in_one_line_naming_the_key(tmp_path):
    """fp16 would need loss scaling that partitioned loading and the composition's optimizer do not do."""
    assert "  composition.dtype: Input should be 'float32' or 'bfloat16'" in rejection(
        write(tmp_path, {"composition.dtype": "float16"}))

