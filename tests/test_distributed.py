"""Multi-process tests: DeepSpeed ZeRO-3 over gloo, and full `calm train` runs on an embedded Ray.

Each costs tens of seconds on 2 cores, so they are few and each checks several things.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm_dist.testing.tiny_models import tiny_model
from launcher.runtime.run_folder import complete_checkpoints, newest_checkpoint
from tests.distributed.runs import ENV, ROOT, assert_same_composition, hub_style, tiny_config, train

pytestmark = pytest.mark.distributed


def test_each_rank_holds_half_of_each_anchor_and_gathers_it_exactly(tmp_path, smollm2):
    """Llama (untied), Gemma, Qwen2 and GPT-2 (tied) as save_pretrained writes them, GPT-2 and Gemma as
    hubs publish them, and the real SmolLM2 in fp32 and bf16, loaded one after the other by the same two
    ranks: each holds half, and the partitioned model is from_pretrained's, logits and buffers included."""
    checkpoints = {"llama": tmp_path / "llama"}
    tiny_model("llama", layers=4, width=128, heads=4, seed=0).save_pretrained(checkpoints["llama"])
    for seed, family in enumerate(("gemma", "qwen2", "gpt2"), start=1):
        checkpoints[family] = tmp_path / family
        tiny_model(family, layers=2, width=64, heads=4, seed=seed, tied=True).save_pretrained(checkpoints[family])
    for seed, family in enumerate(("gpt2", "gemma"), start=10):
        checkpoints[f"{family}-hub"] = tmp_path / f"{family}-hub"
        hub_style(family, checkpoints[f"{family}-hub"], seed)
    stored = {name: set(load_file(path / "model.safetensors")) for name, path in checkpoints.items()}
    assert "lm_head.weight" not in stored["gpt2"] and "transformer.wte.weight" in stored["gpt2"]
    assert "wte.weight" in stored["gpt2-hub"] and "h.0.attn.bias" in stored["gpt2-hub"]
    assert "embed_tokens.weight" in stored["gemma-hub"]

    loads = [("float32", path) for path in checkpoints.values()] + [("float32", smollm2), ("bfloat16", smollm2)]
    out = tmp_path / "report"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests/distributed/partition_check.py"), str(out), *(f"{d}:{path}" for d, path in loads)],
        check=True, env=ENV, cwd=ROOT, timeout=600,
    )
    reports = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for name, rank0, rank1 in zip([*checkpoints, "smollm2", "smollm2-bf16"], *reports, strict=True):
        for report in (rank0, rank1):
            assert report["equal_file"] and report["equal_reference"], name
            # bf16 once moved SmolLM2's logits by 1.0: zero.Init had rounded the rotary inv_freq to bf16.
            assert report["max_logit_difference"] == 0.0, name
            assert report["buffers"] == report["reference_buffers"], name
            # The same parameters as from_pretrained builds: a tied head is the embedding, held once.
            assert report["parameters"] == report["reference_parameters"], name
            assert report["head_is_embedding"] == (name != "llama"), name
            assert abs(report["local_bytes"] / report["total_bytes"] - 0.5) < 0.05, name
        assert rank0["local_bytes"] + rank1["local_bytes"] >= rank0["total_bytes"], name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step colocated run ('straight') and its config; other runs are compared with it."""
    tmp_path = tmp_path_factory.mktemp("runs")
    config = tiny_config(tmp_path, steps=4, checkpoint_every=2)
    train(config, "--set", "name=straight")
    return tmp_path, config


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pipelined_placement_with_activation_checkpointing_gives_the_same_training_as_colocated(tiny_run):
    tmp_path, config = tiny_run
    # 2 anchor ranks + 1 augmenting rank serving both, two micro-batches prefetched. The anchor ranks also
    # recompute their layers in the backward pass: re-run layers must see the composition's states too, and
    # then recomputation changes nothing (one run for both: each costs half a minute of Ray here).
    train(config, "--set", "name=pipelined", "--set", "placement.mode=pipelined",
          "--set", "placement.augmenting_workers=1", "--set", "placement.prefetch=2",
          "--set", "deepspeed.activation_checkpointing=true")
    colocated, pipelined = losses(tmp_path / "out/straight"), losses(tmp_path / "out/pipelined")
    assert len(colocated) == len(pipelined) == 4
    for a, b in zip(colocated, pipelined, strict=True):
        assert abs(a - b) <= 1e-6
    # Same states reach the anchor, so the same updates: bitwise here.
    assert_same_composition(tmp_path / "out", "straight", "pipelined", trained_steps=4)


def forget_newest_registration(run_storage: Path) -> int:
    """Make Ray Train's snapshot one checkpoint behind the disk, as when the driver is killed between a
    checkpoint's upload and its registration; the step it now calls latest."""
    path = run_storage / "checkpoint_manager_snapshot.json"
    snapshot = json.loads(path.read_text())
    steps = [entry["metrics"]["step"] for entry in snapshot["checkpoint_results"]]
    newest = steps.index(max(steps))
    del snapshot["checkpoint_results"][newest]
    del snapshot["checkpoint_report_indices"][newest]
    snapshot["latest_checkpoint_result"] = snapshot["checkpoint_results"][-1]
    path.write_text(json.dumps(snapshot))
    return snapshot["latest_checkpoint_result"]["metrics"]["step"]


@pytest.mark.timeout(900)  # three runs: a first part, a refused resume, the resume
def test_resumed_training_equals_uninterrupted_training(tiny_run):
    tmp_path, config = tiny_run
    run_storage = tmp_path / "ray/resumed"
    train(config, "--set", "name=resumed", "--set", "training.steps=3")  # checkpoints at steps 2 and 3
    assert forget_newest_registration(run_storage) == 2

    # Resuming on other data is an input error the workers meet (the driver, which refuses other batch sizes
    # before Ray starts, does not count records): one line naming the checkpoint's file, exit 2, and no retry
    # although ray.max_failures allows two.
    fewer = tmp_path / "assets/half.jsonl"
    fewer.write_text("".join((tmp_path / "assets/train.jsonl").read_text().splitlines(keepends=True)[:256]))
    failed = train(config, "--set", "name=resumed", "--resume", "--set", f"data.train={fewer}",
                   "--set", "ray.max_failures=2", expect=2)
    newest = newest_checkpoint(run_storage)
    assert newest.step == 3
    *_, error_line, log_line = failed.stderr.strip().splitlines()  # the error, then where the whole story is
    assert log_line.startswith("log: ") and Path(log_line.removeprefix("log: ")).is_file()
    assert error_line == (
        f"calm train: error: {newest.path}/training_state.json: cannot resume the data position: it was saved with "
        "num_samples=512 but this run has num_samples=256; resume with the same data and sharding, or start afresh")
    assert "attempt 1 failed" not in failed.stdout + failed.stderr

    # --resume continues from the newest complete checkpoint on disk (step 3), not Ray's snapshot (step 2).
    resumed = train(config, "--set", "name=resumed", "--resume")
    assert [int(s) for s in re.findall(r"step (\d+)  loss", resumed.stdout)] == [4]
    # Same data order, optimizer moments and schedule, and gloo reduces in a fixed order: bitwise.
    assert_same_composition(tmp_path / "out", "straight", "resumed", trained_steps=4)
    # Two checkpoints kept (steps 2 and 4, those Ray registered); step 3, never registered, is gone.
    assert [c.step for c in complete_checkpoints(run_storage)] == [2, 4]
    assert len([p for p in run_storage.glob("checkpoint_*") if p.is_dir()]) == 2

    # Checkpoints hold the composition and its optimizer state, never the frozen models.
    checkpoint = newest_checkpoint(run_storage).path
    composition = load_file(tmp_path / "out/resumed/composition/composition.safetensors")
    model_states = torch.load(next(checkpoint.rglob("*model_states.pt")), weights_only=False)
    assert set(model_states["module"]) == {f"composition.{k}" for k in composition}
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    anchor_bytes = (tmp_path / "assets/anchor/model.safetensors").stat().st_size
    n_composition = sum(t.numel() for t in composition.values())
    assert checkpoint_bytes < n_composition * 4 * 4 + 200_000  # fp32 params + 2 Adam moments + slack
    assert checkpoint_bytes < anchor_bytes


def test_offload_and_every_zero_stage_train_as_zero3_does(tmp_path):
    """deepspeed.offload_optimizer (suggested by `calm plan`) once made DeepSpeed refuse our torch AdamW,
    and zero_stage 0-2 broke on the workers: now 2 steps with the optimizer (and the parameters)
    offloaded, and under stages 2 and 0, log the losses of plain ZeRO-3."""
    config = tiny_config(tmp_path, steps=2, checkpoint_every=2)
    out = tmp_path / "losses"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "tests/distributed/zero_settings_check.py"), str(config), str(out)],
                   check=True, env=ENV, cwd=ROOT, timeout=600, capture_output=True)
    losses = json.loads(Path(f"{out}.0").read_text())
    assert len(losses["none"]) == 2 and losses["none"][1] < losses["none"][0]
    for run in ("optimizer", "parameters", "stage 2", "stage 0"):
        assert losses[run] == pytest.approx(losses["none"], rel=1e-6), run



def test_one_zero3_rank_keeps_every_parameter_whole_unless_offloaded():
    """With one rank a partition is the whole model: gathering per module would only cost time. Offloaded
    parameters and several ranks keep DeepSpeed's default (small tensors persist, the rest is gathered)."""
    from calm_dist.distributed.engine import deepspeed_config

    def threshold(**kwargs):
        config = deepspeed_config(micro_batch_size=2, gradient_accumulation_steps=1, **kwargs)
        return config["zero_optimization"].get("stage3_param_persistence_threshold")

    assert threshold(data_parallel_size=1) >= 2**62
    assert threshold(data_parallel_size=2) is None
    assert threshold(data_parallel_size=1, offload_params=True) is None
    assert threshold(data_parallel_size=1, zero_stage=2) is None
