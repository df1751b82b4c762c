"""`calm plan`: memory per worker from model configs alone, the fit check in `calm train`'s preflight,
and the merge plan. Accuracy against measured memory is bench/plan_accuracy.py's job."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml

from calm_dist.distributed.fit_suggestions import fit_suggestions
from calm_dist.distributed.memory_plan import GIB, peak, train_plan
from calm_dist.model.composed import compose
from calm_dist.testing.tiny_models import tiny_model
from calm_dist.testing.tokenizers import tiny_tokenizer
from launcher.plan.command import check_fits, model_shape, parse_size, train_setup
from launcher.train_config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "configs" / "models"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    paths = {"anchor": root / "anchor", "aug": root / "aug", "gpt2": root / "gpt2", "train": root / "train.jsonl"}
    tiny_model("llama", layers=4, width=64, heads=4, seed=0).save_pretrained(paths["anchor"])
    tiny_tokenizer().save_pretrained(paths["anchor"])
    tiny_model("llama", layers=4, width=32, heads=2, seed=1).save_pretrained(paths["aug"])
    tiny_model("gpt2", layers=2, width=32, heads=2, seed=2).save_pretrained(paths["gpt2"])
    paths["train"].write_text("".join(json.dumps({"text": f"{i}+{i}={2 * i}"}) + "\n" for i in range(8)))
    return paths


def config(folders, **changes) -> TrainConfig:
    raw = {
        "name": "plan",
        "models": {"anchor": {"path": str(folders["anchor"]), "dtype": "float32"},
                   "augmenting": [{"path": str(folders["aug"]), "dtype": "float32"}]},
        "composition": {"every_n": 2},
        "data": {"train": str(folders["train"]), "text_field": "text", "max_length": 16},
        "training": {"steps": 2, "micro_batch_size": 2, "global_batch_size": 4},
        "ray": {"num_workers": 2},
    }
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return TrainConfig.model_validate(raw)


# --------------------------------------------------------------------------------------------------
# Shapes and terms


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shapes_from_the_config_count_every_tensor_of_the_real_model(folders, family):
    path = folders["anchor" if family == "llama" else "gpt2"]
    shape = model_shape(str(path), "bfloat16")
    model = tiny_model(family, layers=4 if family == "llama" else 2, width=64 if family == "llama" else 32,
                       heads=4 if family == "llama" else 2, seed=0)
    assert sorted(shape.tensor_sizes) == sorted(p.numel() for p in model.parameters())
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.bytes == 2 * shape.parameters


def test_the_anchor_partition_is_one_nth_of_the_large_tensors_and_all_of_the_small(folders):
    sizes = [p.numel() for p in tiny_model("llama", layers=4, width=64, heads=4).parameters()]
    for workers, threshold in ((1, 100_000), (2, 100_000), (2, 1000), (3, 0)):
        setup = replace(train_setup(config(folders, ray__num_workers=workers, training__global_batch_size=2 * workers)),
                        persistence_threshold=threshold)
        expected = 4 * sum(n if n <= threshold else math.ceil(n / workers) for n in sizes)
        assert train_plan(setup)[0].term("anchor weights (ZeRO-3 partition)") == expected


def test_composition_state_is_sixteen_bytes_per_parameter_split_over_the_workers(folders):
    anchor = tiny_model("llama", layers=4, width=64, heads=4)
    composed = compose(anchor, tiny_model("llama", layers=4, width=32, heads=2), every_n=2)
    sizes = [p.numel() for p in composed.composition_parameters()]
    setup = replace(train_setup(config(folders)), persistence_threshold=0)
    assert sorted(setup.composition_tensor_sizes) == sorted(sizes)
    assert setup.composition_parameters == sum(sizes)
    held = train_plan(setup)[0].term("composition weights, gradients, optimizer state")
    assert held == 16 * sum(math.ceil(n / 2) for n in sizes)


def test_checkpointing_and_pipelining_move_memory_where_they_should(folders):
    base = train_setup(config(folders, data__max_length=512))
    base = replace(base, anchor=replace(base.anchor, layers=32))  # checkpointing pays off over many layers
    checkpointed = replace(base, activation_checkpointing=True)
    assert train_plan(checkpointed)[0].term("activations") < train_plan(base)[0].term("activations")
    pipelined = replace(base, pipelined=True, augmenting_workers=1)
    anchor_plan, augmenting_plan = train_plan(pipelined)
    assert augmenting_plan.role == "augmenting worker"
    names = [t.name for t in anchor_plan.terms]
    assert "augmenting models (a copy per worker)" not in names and "augmenting states received" in names
    aug_bytes = sum(m.bytes for m in base.augmenting)
    if not base.gpu:  # only the backbone runs; its weights are mapped, so the LM head is never resident
        aug_bytes -= sum(m.lm_head * m.dtype_bytes for m in base.augmenting)
    assert augmenting_plan.term("augmenting models") == aug_bytes
    assert train_plan(base)[0].term("augmenting models (a copy per worker)") == aug_bytes


# --------------------------------------------------------------------------------------------------
# The 70B example config


@pytest.fixture(scope="module")
def big() -> TrainConfig:
    return load_config(ROOT / "configs/calm-70b-7b.yaml", {
        "models.anchor.path": str(MODELS / "llama-3.1-70b"), "models.augmenting.0.path": str(MODELS / "llama-3.1-8b")})


def test_the_70b_example_fits_80gb_gpus_and_counts_what_its_comments_say(big):
    setup = train_setup(big)
    assert setup.composition_parameters == 2_415_984_640  # 8 connections of 4096*8192 + 8192 + 4*8192^2
    assert setup.anchor.parameters == 70_553_706_496 and setup.augmenting[0].parameters == 8_030_261_248
    (plan,) = train_plan(setup)
    assert plan.term("anchor weights (ZeRO-3 partition)") == pytest.approx(2 * 70.55e9 / 16, rel=0.001)
    assert plan.total <= 80e9
    assert fit_suggestions(setup, 80 * 10**9) and all(s.total < plan.total for s in fit_suggestions(setup, 80 * 10**9))


def test_logits_past_the_losss_chunk_size_are_planned_as_the_chunked_loss_keeps_them(big):
    """The plan's chunk size is the loss's; below it the loss keeps an fp32 copy and the log-softmax of
    every logit, above it the logits' gradient and one chunk's fp32 arrays (the 70B example: 16k tokens
    of a 128k vocabulary, 2.1e9 logits)."""
    from calm_dist.distributed.memory_plan import LOSS_CHUNK_LOGITS, logits_and_loss
    from calm_dist.model.objectives import CHUNK_LOGITS

    assert LOSS_CHUNK_LOGITS == CHUNK_LOGITS
    assert logits_and_loss(1000, 1000, 2).bytes == 1000 * 1000 * (2 + 8)
    setup = train_setup(big)
    (plan,) = train_plan(setup)
    logits = setup.tokens * setup.anchor.vocab
    assert logits > CHUNK_LOGITS
    chunk = CHUNK_LOGITS // setup.anchor.vocab * setup.anchor.vocab
    assert plan.term("logits and loss") == 2 * logits * setup.anchor.dtype_bytes + 12 * chunk


def test_each_suggestion_reports_the_total_of_the_changed_config(big):
    setup = replace(train_setup(big), activation_checkpointing=False, micro_batch=2)
    memory = 80 * 10**9
    assert peak(setup) > memory
    suggestions = {s.change.split(":")[0]: s for s in fit_suggestions(setup, memory)}
    assert suggestions["deepspeed.activation_checkpointing"].total == peak(replace(setup, activation_checkpointing=True))
    assert suggestions["deepspeed.activation_checkpointing"].fits
    assert suggestions["training.micro_batch_size"].total == peak(replace(setup, micro_batch=1))
    assert suggestions["deepspeed.offload_optimizer"].total == peak(replace(setup, offload_optimizer=True))
    assert not suggestions["deepspeed.offload_optimizer"].fits


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def plan_command(capsys, monkeypatch):
    """`calm plan ARGS` in this process (run from the repository root): its exit code and output."""
    from launcher.cli import main

    monkeypatch.chdir(ROOT)

    def run(*args: str) -> Done:
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", *args])
        out = capsys.readouterr()
        return Done(exit_info.value.code, out.out, out.err)

    return run


def test_calm_plan_prints_the_fit_and_the_changes_that_would_make_it_fit(plan_command):
    models = ["--set", "models.anchor.path=models/llama-3.1-70b", "--set", "models.augmenting.0.path=models/llama-3.1-8b"]
    fits = plan_command("configs/calm-70b-7b.yaml", "--device-memory", "80GB", *models)
    assert fits.returncode == 0, fits.stderr
    assert "fits in 74.5 GiB (--device-memory)" in fits.stdout and "runtime allowance" in fits.stdout
    too_big = plan_command("configs/calm-70b-7b.yaml", "--device-memory", "80GB", *models,
                           "--set", "deepspeed.activation_checkpointing=false")
    assert too_big.returncode == 1
    assert "does NOT fit in 74.5 GiB" in too_big.stdout
    assert "deepspeed.activation_checkpointing: true" in too_big.stdout
    missing = plan_command("configs/calm-70b-7b.yaml")  # the models live on a cluster's storage
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "calm plan: error: models.anchor.path: /mnt/shared/models/Llama-3.1-70B has no config.json "
        "(the plan reads only the model's config)")


# --------------------------------------------------------------------------------------------------
# calm train's preflight


def test_train_preflight_refuses_a_config_that_cannot_fit_naming_the_largest_term(folders):
    from launcher.preflight import preflight

    assert preflight(config(folders, ray__device_memory="64GB")).total_workers == 2
    small = config(folders, ray__device_memory="100MB", data__max_length=512, training__micro_batch_size=2)
    with pytest.raises(ConfigError) as info:
        preflight(small)
    setup = train_setup(small)
    largest = train_plan(setup)[0].largest
    assert str(info.value).startswith(f"ray.num_workers: an anchor worker needs {peak(setup) / GIB:.1f} GiB, more than "
                                      "the 0.1 GiB of its device (ray.device_memory); the largest part is "
                                      f"{largest.name}, {largest.bytes / GIB:.1f} GiB.")


def test_no_device_memory_known_means_no_refusal(folders):
    check_fits(config(folders))  # CPU workers, no ray.device_memory: nothing to check against
    if not torch.cuda.is_available():
        check_fits(config(folders, ray__use_gpu=True))


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("80GB", "k") == 80 * 10**9 and parse_size("1.5GiB", "k") == 3 * 2**29
    with pytest.raises(ConfigError, match=r"^ray.device_memory: 'eighty' is not a size such as 80GB"):
        parse_size("eighty", "ray.device_memory")


# --------------------------------------------------------------------------------------------------
# Merge configs


def test_calm_plan_on_a_merge_config_gives_worker_memory_disk_and_time(tmp_path, plan_command):
    from calm_dist.testing.tiny_checkpoints import write_demo
    from merge.planning.plan import OUT_BUFFERS

    write_demo(tmp_path / "demo")
    cfg = tmp_path / "merge.yaml"
    text = (ROOT / "configs/cocktail-tiny.yaml").read_text().replace("../runs/cocktail-demo", str(tmp_path / "demo"))
    cfg.write_text(text)
    done = plan_command(str(cfg), "--disk-speed", "100MB")
    assert done.returncode == 0, done.stderr
    assert "merge worker (peak anonymous memory)" in done.stdout and "loss worker" in done.stdout
    assert f"{OUT_BUFFERS} chunks of" in done.stdout and "at 100 MB/s (given)" in done.stdout


def test_set_reaches_into_lists_by_index(tmp_path):
    path = ROOT / "configs/calm-70b-7b.yaml"
    config = load_config(path, {"models.augmenting.0.dtype": "float32"})
    assert config.models.augmenting[0].dtype == "float32"
    with pytest.raises(ConfigError) as info:
        load_config(path, {"models.augmenting.1.path": "x"})
    assert str(info.value) == f"{path}: cannot set models.augmenting.1.path: models.augmenting has no item 1 (indices 0..0)"
    with pytest.raises(ConfigError, match="models.augmenting is a list; give an index"):
        load_config(path, {"models.augmenting.path": "x"})


def test_a_merge_plan_counts_no_more_read_buffer_than_its_reads_take():
    """Chunks share the read buffers, so inputs smaller than the read-ahead never touch all of it."""
    from merge.planning.memory import MergeSetup, merge_terms

    setup = dict(inputs=3, input_bytes=2**30, output_bytes=2**30, largest_input_itemsize=2, output_itemsize=2,
                 chunk_elements=2**20, read_slots=10, largest_tensor=2**24, block=2**18, out_buffers=3,
                 worker_runtime=0, workers=1, max_shard_bytes=2**30)
    large = merge_terms(MergeSetup(**setup, read_bytes=10 * 2**30)).term("input read buffers")
    small = merge_terms(MergeSetup(**setup, read_bytes=5 * 2**20)).term("input read buffers")
    assert (large, small) == (10 * 2**20 * 3 * 2, 5 * 2**20)


# --------------------------------------------------------------------------------------------------
# Merge configs planned before the download: from the models' configs


def _config_only_copy(real: Path, folder: Path) -> Path:
    """What a user fetches before the weights: config.json, and the index when the model has one."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors.index.json"):
        if (real / name).exists():
            shutil.copy(real / name, folder)
    return folder


@pytest.mark.parametrize("kind", ["llama in shards", "llama, tied, one file", "gpt2, tied"])
def test_tensors_planned_from_a_config_are_those_its_weights_hold_byte_for_byte(tmp_path, kind):
    from calm_dist.testing.tiny_checkpoints import tiny_llama
    from merge.merge_config import validate_config
    from merge.planning.config_only import plan_inputs

    real = tmp_path / "real"
    if kind.startswith("gpt2"):
        tiny_model("gpt2", layers=2, width=32, heads=2).save_pretrained(real)
    else:
        tiny_llama(real, seed=0, tie="tied" in kind, shard_size="40KB" if "shards" in kind else None, tokenizer=False)
    configs = _config_only_copy(real, tmp_path / "configs")
    cfg = validate_config({"method": "linear", "output": {"path": str(tmp_path / "out")}, "models": [
        {"name": "later", "path": str(tmp_path / "not-yet"), "config": str(configs)}, {"name": "now", "path": str(real)}]})
    planned, read = plan_inputs(cfg)
    assert read.from_config is None and planned.from_config.startswith(f"{tmp_path / 'not-yet'} does not exist; "
                                                                       f"its tensors from {configs / 'config.json'}")

    def where(checkpoint):  # name, dtype, shape, file and offset of every tensor, in file order
        return [(t.name, t.dtype, t.shape, t.nbytes, Path(t.path).name, t.offset) for t in checkpoint.tensors.values()]

    assert where(planned.checkpoint) == where(read.checkpoint)
    assert planned.checkpoint.ties_embeddings == read.checkpoint.ties_embeddings == ("tied" in kind)


def test_calm_plan_before_the_download_gives_the_figures_of_the_weights_and_says_so(tmp_path, plan_command):
    from calm_dist.testing.tiny_checkpoints import write_demo

    write_demo(tmp_path / "demo")  # base in one file, math and code in shards with an index
    text = (ROOT / "configs/cocktail-tiny.yaml").read_text().replace("../runs/cocktail-demo", str(tmp_path / "demo"))
    (tmp_path / "weights.yaml").write_text(text)
    raw = yaml.safe_load(text)
    for model in raw["models"]:
        model["config"] = str(_config_only_copy(tmp_path / "demo" / model["name"], tmp_path / "configs" / model["name"]))
        model["path"] = str(tmp_path / "download" / model["name"])
    (tmp_path / "configs.yaml").write_text(yaml.safe_dump(raw))
    from_weights = plan_command(str(tmp_path / "weights.yaml"), "--disk-speed", "100MB")
    from_configs = plan_command(str(tmp_path / "configs.yaml"), "--disk-speed", "100MB")
    assert (from_weights.returncode, from_configs.returncode) == (0, 0), from_configs.stderr
    assert "planned from configs" not in from_weights.stdout
    lines = from_configs.stdout.splitlines()
    assert lines[0] == ("planned from configs only for 3 of 3 models: the merge needs their weights on disk, "
                        "and reads their headers then")
    assert lines[1] == (f"  base: {tmp_path / 'download/base'} does not exist; its tensors from "
                        f"{tmp_path / 'configs/base/config.json'}, bfloat16")
    assert lines[2].endswith("config.json and model.safetensors.index.json, bfloat16")
    assert lines[4:] == from_weights.stdout.splitlines()  # every figure as from the weights' headers


def test_the_shipped_70b_merge_plans_before_its_download_and_asks_for_the_disk_speed(plan_command):
    done = plan_command("configs/cocktail-70b.yaml")  # README: `calm plan configs/cocktail-70b.yaml --disk-speed 500MB`
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("planned from configs only for 3 of 3 models")
    assert "  base: /mnt/shared/models/Llama-3.1-70B-Instruct does not exist; its tensors from " in done.stdout
    assert "merge of 3 models, 4 worker(s), 30 output shard(s):" in done.stdout
    assert done.stdout.endswith("time: no input is on disk to measure the disk's speed on; give --disk-speed "
                                "(e.g. 500MB)\n")


def test_which_config_a_merge_plan_reads_and_when(tmp_path):
    from calm_dist.testing.tiny_checkpoints import tiny_llama
    from merge.merge_config import validate_config
    from merge.merge_errors import CheckpointError
    from merge.merge_errors import ConfigError as MergeConfigError
    from merge.planning.config_only import plan_inputs

    tiny_llama(tmp_path / "real", seed=0, shard_size="40KB", tokenizer=False)
    configs = _config_only_copy(tmp_path / "real", tmp_path / "configs")

    def plan(path: Path, config: Path | None = None):
        entry = {"name": "m", "path": str(path)} | ({"config": str(config)} if config else {})
        cfg = validate_config({"method": "linear", "models": [entry, {"name": "real", "path": str(tmp_path / "real")}],
                               "output": {"path": str(tmp_path / "out")}})
        return plan_inputs(cfg)[0]

    # A download under way (config and index first, one shard still missing): its own config, not `config:`.
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "real", partial)
    next(partial.glob("model-00002-*.safetensors")).unlink()
    planned = plan(partial, config=tmp_path / "elsewhere")
    assert planned.from_config.startswith(f"{partial} misses shards its model.safetensors.index.json names; "
                                          f"its tensors from {partial / 'config.json'}")
    assert plan(tmp_path / "real", config=configs).from_config is None  # weights on disk: their headers
    with pytest.raises(CheckpointError) as info:
        plan(tmp_path / "nowhere")
    assert str(info.value) == (f"model 'm': {tmp_path / 'nowhere'} does not exist, and there is no config to plan "
                               "from: give models[0].config, a folder holding the model's config.json (and its "
                               "model.safetensors.index.json if at hand)")
    with pytest.raises(MergeConfigError, match=f"^models\\[0\\].config: {tmp_path / 'real-ish'} has no config.json$"):
        plan(tmp_path / "nowhere", config=tmp_path / "real-ish")
    # Where the plan read a config is no part of the merge's identity (its resume fingerprint).
    cfg = validate_config({"method": "linear", "output": {"path": "o"}, "models": [
        {"name": "a", "path": "a", "config": "c"}, {"name": "b", "path": "b"}]})
    assert cfg.models[0].config == Path.cwd() / "c" and "config" not in cfg.model_dump(mode="json")["models"][0]


def test_keep_anchor_rows_add_the_anchor_alones_logits_to_the_plan(big):
    """A run whose data marks keep_anchor rows (data.keep_anchor_field) holds the anchor alone's logits
    through the loss, and the KL's fp32 log-softmax of them (whole, or one chunk's past the chunk size)."""
    from calm_dist.distributed.memory_plan import LOSS_CHUNK_LOGITS, anchor_alone_logits

    setup = train_setup(big)
    assert not setup.keep_anchor
    kept = replace(setup, keep_anchor=True)
    (plan,), (plan_kept,) = train_plan(setup), train_plan(kept)
    logits = setup.tokens * setup.anchor.vocab
    chunk = LOSS_CHUNK_LOGITS // setup.anchor.vocab * setup.anchor.vocab
    term = "anchor alone's logits (keep_anchor)"
    assert plan_kept.term(term) == logits * setup.anchor.dtype_bytes + 4 * chunk
    assert plan_kept.total > plan.total + plan_kept.term(term)  # and the fragmentation allowance on it
    assert anchor_alone_logits(1000, 1000, 4).bytes == 1000 * 1000 * (4 + 4)
    marked = big.model_copy(update={"data": big.data.model_copy(update={"keep_anchor_field": "keep_anchor"})})
    assert train_setup(marked).keep_anchor
