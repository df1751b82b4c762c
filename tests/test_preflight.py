"""Preflight: each problem a run would meet late is caught on the driver, naming the key and the path."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig

from calm_dist.model.composed import compose
from calm_dist.model.connections import Connection
from calm_dist.testing.tiny_models import tiny_model
from calm_dist.testing.tokenizers import tiny_tokenizer
from launcher.preflight import describe, preflight
from launcher.train_config import ConfigError, TrainConfig


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models (the anchor with a tokenizer) and data files, built once for the module."""
    root = tmp_path_factory.mktemp("preflight")
    paths = {name: root / name for name in ("anchor", "aug", "gpt2", "wide_vocab", "bert", "train", "qa")}
    tiny_model("llama", layers=4, width=64, heads=4, seed=0).save_pretrained(paths["anchor"])
    tiny_tokenizer().save_pretrained(paths["anchor"])
    tiny_model("llama", layers=4, width=32, heads=2, seed=1).save_pretrained(paths["aug"])
    tiny_model("gpt2", layers=4, width=32, heads=2, seed=2).save_pretrained(paths["gpt2"])
    tiny_model("llama", layers=4, width=32, heads=2, vocab=256, seed=3).save_pretrained(paths["wide_vocab"])
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64).save_pretrained(
        paths["bert"])
    paths["train"] = root / "train.jsonl"
    paths["train"].write_text("".join(json.dumps({"text": f"{i}+{i}={2 * i}"}) + "\n" for i in range(8)))
    paths["qa"] = root / "qa.jsonl"
    paths["qa"].write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(8)))
    return paths


def make(folders: dict[str, Path], changes: dict | None = None) -> TrainConfig:
    """A config over the tiny folders, with dotted-key `changes`."""
    raw = {
        "name": "tiny",
        "models": {"anchor": {"path": str(folders["anchor"])}, "augmenting": [{"path": str(folders["aug"])}]},
        "composition": {"every_n": 2},
        "data": {"train": str(folders["train"]), "text_field": "text"},
        "training": {"steps": 2, "micro_batch_size": 1, "global_batch_size": 2},
    }
    raw = copy.deepcopy(raw)
    for dotted, value in (changes or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return TrainConfig.model_validate(raw)


def failure(config: TrainConfig) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(config)
    return str(info.value)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# A config that can run


def test_a_runnable_config_passes_and_reports_what_the_model_will_build(folders):
    config = make(folders, {"data.eval": str(folders["train"])})
    report = preflight(config)
    anchor = tiny_model("llama", layers=4, width=64, heads=4, seed=0)
    composed = compose(anchor, tiny_model("llama", layers=4, width=32, heads=2, seed=1), every_n=2)
    assert list(report.connections) == composed.connections
    assert report.composition_parameters == sum(p.numel() for p in composed.composition_parameters())
    assert report.anchor_parameters == sum(p.numel() for p in anchor.parameters())
    assert (report.anchor.hidden_size, report.anchor.num_layers, report.augmenting[0].hidden_size) == (64, 4, 32)
    assert (report.num_heads, report.train_records, report.eval_records) == (4, 8, 8)
    assert (report.placement, report.total_workers) == ("colocated", 2)
    summary = describe(report)
    assert "  connections (its layer -> anchor layer): 1->1, 3->3" in summary
    assert f"{report.composition_parameters:,} trainable parameters" in summary
    assert "data:          8 train records, 8 eval records" in summary


def test_explicit_connections_over_several_augmenting_models_and_a_gpt2(folders):
    config = make(folders, {
        "models.augmenting": [{"path": str(folders["aug"])}, {"path": str(folders["gpt2"])}],
        "composition": {"connections": [[1, 3, 3], [0, 1, 2]]},
    })
    report = preflight(config)
    assert report.connections == (Connection(0, 1, 2), Connection(1, 3, 3))
    assert report.augmenting[1].model_type == "gpt2"


def test_pipelined_placement_counts_the_augmenting_workers(folders):
    report = preflight(make(folders, {"placement.mode": "pipelined", "placement.augmenting_workers": 2}))
    assert report.total_workers == 4


# --------------------------------------------------------------------------------------------------
# Models


def test_a_missing_anchor_folder(folders, tmp_path):
    missing = tmp_path / "x" / "y"
    assert failure(make(folders, {"models.anchor.path": str(missing)})) == f"models.anchor.path: {missing}: no such folder"


def test_a_folder_without_config_json(folders, tmp_path):
    assert failure(make(folders, {"models.anchor.path": str(tmp_path)})) == (
        f"models.anchor.path: {tmp_path} is not a Hugging Face model folder (no config.json)")


def test_an_unreadable_config_json(folders, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": ')
    message = failure(make(folders, {"models.augmenting": [{"path": str(tmp_path)}]}))
    assert message.startswith(f"models.augmenting.0.path: {tmp_path}/config.json cannot be read: ")


def test_an_unsupported_architecture(folders):
    message = failure(make(folders, {"models.augmenting": [{"path": str(folders["bert"])}]}))
    assert message.startswith(
        f"models.augmenting.0.path: {folders['bert']} is a 'bert' model, not a supported architecture (supported: ")
    assert "llama" in message and "calm_dist.model.architectures.DECODER_LAYERS" in message


def test_a_model_folder_without_weights(folders, tmp_path):
    (tmp_path / "config.json").write_text((folders["aug"] / "config.json").read_text())
    assert failure(make(folders, {"models.augmenting": [{"path": str(tmp_path)}]})) == (
        f"models.augmenting.0.path: {tmp_path} has a config.json but no weights "
        "(*.safetensors or pytorch_model*.bin)")


def test_an_index_naming_a_missing_shard(folders, tmp_path):
    anchor = tmp_path / "anchor"
    shutil.copytree(folders["anchor"], anchor)
    index = anchor / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert failure(make(folders, {"models.anchor.path": str(anchor)})) == (
        f"models.anchor.path: {index} names model-00002-of-00002.safetensors, which is missing "
        "(an unfinished download?)")


def test_a_truncated_safetensors_file(folders, tmp_path):
    anchor = tmp_path / "anchor"
    shutil.copytree(folders["anchor"], anchor)
    weights = anchor / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    message = failure(make(folders, {"models.anchor.path": str(anchor)}))
    assert message.startswith(f"models.anchor.path: {weights} is not a readable safetensors file (")


def cut_in_half(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("role", ["anchor", "augmenting"])
def test_weights_cut_in_half_fail_naming_the_model_and_file(folders, tmp_path, role):
    model = tmp_path / role
    shutil.copytree(folders["anchor" if role == "anchor" else "aug"], model)
    cut_in_half(model / "model.safetensors")
    key = "models.anchor.path" if role == "anchor" else "models.augmenting.0.path"
    changes = {key: str(model)} if role == "anchor" else {"models.augmenting": [{"path": str(model)}]}
    message = failure(make(folders, changes))
    assert message.startswith(f"{key}: {model / 'model.safetensors'} is not a readable safetensors file (truncated, "
                              "an unfinished download?: its tensors need ")


def rewrite_weights(file: Path, edit) -> None:
    """Rewrite a safetensors file with edit(header, data) -> (header, data) applied to its raw parts."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = edit(json.loads(raw[8 : 8 + length]), raw[8 + length :])
    encoded = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_overlapping_offsets_and_foreign_dtypes_and_trailing_bytes(folders, tmp_path):
    anchor = tmp_path / "anchor"
    shutil.copytree(folders["anchor"], anchor)
    weights = anchor / "model.safetensors"
    original = weights.read_bytes()

    def overlap(header, data):
        first, second = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])[:2]
        header[second]["data_offsets"] = header[first]["data_offsets"]
        return header, data

    rewrite_weights(weights, overlap)
    assert "expected" in failure(make(folders, {"models.anchor.path": str(anchor)}))
    weights.write_bytes(original + b"\0" * 8)
    assert "(trailing bytes" in failure(make(folders, {"models.anchor.path": str(anchor)}))

    def int8_norm(header, data):  # same byte count, another dtype: a quantized checkpoint
        header["model.norm.weight"]["dtype"] = "I8"
        header["model.norm.weight"]["shape"] = [4 * header["model.norm.weight"]["shape"][0]]
        return header, data

    weights.write_bytes(original)
    rewrite_weights(weights, int8_norm)
    assert failure(make(folders, {"models.anchor.path": str(anchor)})) == (
        f"models.anchor.path: {weights}: tensor model.norm.weight has shape [256], but {anchor}/config.json implies [64]")


def test_weights_of_another_model_fail_naming_tensor_and_shape(folders, tmp_path):
    anchor = tmp_path / "anchor"
    shutil.copytree(folders["anchor"], anchor)
    shutil.copy(folders["aug"] / "model.safetensors", anchor / "model.safetensors")  # width 32, config says 64
    assert failure(make(folders, {"models.anchor.path": str(anchor)})) == (
        f"models.anchor.path: {anchor / 'model.safetensors'}: tensor lm_head.weight has shape [128, 32], but "
        f"{anchor}/config.json implies [128, 64]")

    tensors = load_file(folders["anchor"] / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, anchor / "model.safetensors")
    assert failure(make(folders, {"models.anchor.path": str(anchor)})) == (
        f"models.anchor.path: {anchor}: tensor model.norm.weight is missing from the checkpoint (nor is it tied to a "
        "stored tensor)")


def test_quantized_weights_are_refused(folders, tmp_path):
    aug = tmp_path / "aug"
    shutil.copytree(folders["aug"], aug)
    tensors = load_file(aug / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, aug / "model.safetensors")
    assert failure(make(folders, {"models.augmenting": [{"path": str(aug)}]})) == (
        f"models.augmenting.0.path: {aug / 'model.safetensors'}: tensor model.norm.weight is stored as I8, not a "
        "floating-point type (F16, BF16, F32, F64); quantized checkpoints are not supported")


def test_hub_style_tied_checkpoints_pass_and_count_their_parameters_once(folders, tmp_path):
    gpt2 = tiny_model("gpt2", layers=4, width=32, heads=2, seed=2)
    hub = tmp_path / "gpt2-hub"
    hub.mkdir()
    save_file({n.removeprefix("transformer."): t.contiguous() for n, t in gpt2.state_dict().items()
               if n.startswith("transformer.")}, hub / "model.safetensors")
    gpt2.config.save_pretrained(hub)
    report = preflight(make(folders, {"models.augmenting": [{"path": str(hub)}]}))
    assert report.augmenting[0].model_type == "gpt2"
    anchor_report = preflight(make(folders, {"models.augmenting": [{"path": str(hub)}],
                                             "models.anchor.path": str(folders["anchor"])}))
    assert anchor_report.anchor_parameters == sum(p.numel() for p in tiny_model("llama", seed=0).parameters())


def test_an_anchor_without_safetensors_is_refused(folders, tmp_path):
    anchor = tmp_path / "anchor"
    shutil.copytree(folders["anchor"], anchor)
    (anchor / "model.safetensors").unlink()
    torch.save({}, anchor / "pytorch_model.bin")
    assert failure(make(folders, {"models.anchor.path": str(anchor)})).startswith(
        f"models.anchor.path: {anchor} has no *.safetensors weights; the anchor is loaded partitioned")


def test_a_vocabulary_mismatch(folders):
    message = failure(make(folders, {"models.augmenting": [{"path": str(folders["wide_vocab"])}]}))
    assert message == (
        f"models.augmenting.0.path: {folders['wide_vocab']} has a vocabulary of 256 tokens but the anchor "
        f"(models.anchor.path: {folders['anchor']}) has 128: composition needs models that share a tokenizer")


# --------------------------------------------------------------------------------------------------
# Tokenizer


def test_an_anchor_folder_without_tokenizer_files(folders):
    message = failure(make(folders, {"models.anchor.path": str(folders["aug"]), "composition.every_n": 1}))
    assert message.startswith(f"models.anchor.path: {folders['aug']} has no tokenizer files (none of tokenizer.json")
    assert message.endswith("; set models.tokenizer to the folder that has them")


def test_a_missing_tokenizer_folder(folders, tmp_path):
    missing = tmp_path / "tok"
    assert failure(make(folders, {"models.tokenizer": str(missing)})) == f"models.tokenizer: {missing}: no such folder"


def test_a_tokenizer_larger_than_the_anchor_vocabulary(folders, tmp_path):
    tiny_tokenizer(200).save_pretrained(tmp_path)
    assert failure(make(folders, {"models.tokenizer": str(tmp_path)})) == (
        f"models.tokenizer: the tokenizer in {tmp_path} has 200 tokens but the anchor "
        f"(models.anchor.path: {folders['anchor']}) has a vocabulary of 128")


def test_an_unloadable_tokenizer(folders, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    message = failure(make(folders, {"models.tokenizer": str(tmp_path)}))
    assert message.startswith(f"models.tokenizer: the tokenizer in {tmp_path} cannot be loaded: ")


# --------------------------------------------------------------------------------------------------
# Composition


def test_an_out_of_range_connection(folders):
    message = failure(make(folders, {"composition": {"connections": [[0, 9, 1]]}}))
    assert message == ("composition.connections: connection Connection(augmenting=0, aug_layer=9, anchor_layer=1): "
                       "augmenting layer 9 is out of range (augmenting model 0 has layers 0..3, and -1 for its "
                       "token embeddings)")


def test_a_connection_to_an_augmenting_model_not_given(folders):
    message = failure(make(folders, {"composition": {"connections": [[1, 0, 0]]}}))
    assert message.startswith("composition.connections: connection Connection(augmenting=1, aug_layer=0, "
                              "anchor_layer=0): augmenting model 1 does not exist (1 augmenting model(s) given)")


def test_a_duplicated_connection(folders):
    message = failure(make(folders, {"composition": {"connections": [[0, 1, 1], [0, 1, 1]]}}))
    assert message == ("composition.connections: connection Connection(augmenting=0, aug_layer=1, anchor_layer=1) "
                       "is listed twice")


def test_every_n_larger_than_the_augmenting_model(folders):
    message = failure(make(folders, {"composition.every_n": 5}))
    assert message == ("composition.every_n: augmenting model 0 has 4 layers, fewer than every_n=5: lower every_n "
                       "or list the connections explicitly")


def test_num_heads_not_dividing_the_anchor_width(folders):
    assert failure(make(folders, {"composition.num_heads": 5})) == (
        f"composition.num_heads: 5 heads do not divide the anchor's hidden size 64 "
        f"(models.anchor.path: {folders['anchor']})")


# --------------------------------------------------------------------------------------------------
# Data


def test_a_missing_train_file(folders, tmp_path):
    missing = tmp_path / "train.jsonl"
    assert failure(make(folders, {"data.train": str(missing)})) == f"data.train: {missing}: no such file or folder"


def test_a_train_file_without_the_configured_field(folders):
    message = failure(make(folders, {"data.train": str(folders["qa"])}))
    assert message == (f"data.train: {folders['qa']}: no field 'text' (the text_field); "
                       "its fields are ['question', 'answer']")


def test_an_eval_file_without_the_configured_fields(folders):
    message = failure(make(folders, {"data.eval": str(folders["train"]), "data.text_field": None,
                                     "data.prompt_field": "question", "data.completion_field": "answer",
                                     "data.train": str(folders["qa"])}))
    assert message == f"data.eval: {folders['train']}: no field 'question' (the prompt_field); its fields are ['text']"


def test_fewer_records_than_one_global_batch(folders):
    message = failure(make(folders, {"training.global_batch_size": 16, "training.micro_batch_size": 8}))
    assert message == (f"data.train: {folders['train']} has 8 records, fewer than training.global_batch_size=16 "
                       "(one optimizer step)")


# --------------------------------------------------------------------------------------------------
# Workers, DeepSpeed, the cluster address


def test_gpu_workers_on_an_embedded_cluster_without_enough_gpus(folders, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = failure(make(folders, {"ray.use_gpu": True, "placement.mode": "pipelined"}))
    assert message == (
        "ray.use_gpu: ray.num_workers + placement.augmenting_workers = 2 + 1 = 3 workers (placement.mode: "
        "pipelined) need one GPU each, but the embedded Ray cluster (ray.address not set) has this machine's 2; "
        "set ray.address to a cluster, or lower the worker counts")


def test_parameter_offload_needs_zero_stage_3(folders):
    assert failure(make(folders, {"deepspeed.zero_stage": 2, "deepspeed.offload_params": True})) == (
        "deepspeed.offload_params: parameter offload needs deepspeed.zero_stage 3, not 2")


def test_an_unreachable_ray_address(folders):
    port = closed_port()
    message = failure(make(folders, {"ray.address": f"ray://127.0.0.1:{port}"}))
    assert message.startswith(f"ray.address: cannot reach 127.0.0.1:{port} (Connection refused)")


def test_a_reachable_ray_address_passes(folders):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert preflight(make(folders, {"ray.address": f"http://127.0.0.1:{port}"})).train_records == 8


def test_an_address_that_is_not_one(folders):
    assert failure(make(folders, {"ray.address": "s3://bucket"})) == (
        "ray.address: 's3://bucket' has scheme 's3'; use ray://, http://, https:// or host:port")


def test_a_max_length_leaving_nothing_to_predict(folders, tmp_path):
    qa = {"data.train": str(folders["qa"]), "data.text_field": None, "data.prompt_field": "question",
          "data.completion_field": "answer"}
    # bos + "0+1" fills 4 tokens: the answer is truncated away from every record.
    assert failure(make(folders, {**qa, "data.max_length": 4})) == (
        f"data.max_length: 4 tokens leave no record of {folders['qa']} a token to predict (each loses its "
        "completion or all but one token to truncation); raise data.max_length")
    preflight(make(folders, {**qa, "data.max_length": 5}))
    # One usable record past the first chunk is enough.
    long_prompts = tmp_path / "long.jsonl"
    records = [{"question": "1+1+1+1", "answer": "4"}] * 300 + [{"question": "1", "answer": "1"}]
    long_prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    preflight(make(folders, {**qa, "data.train": str(long_prompts), "data.max_length": 4}))
