"""A run's checkpoints on disk, decided by checkpoints rather than folders, and the driver's handling of
worker errors: all without starting Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from calm_dist.data.records import DataError
from calm_dist.distributed.checkpoint_layout import RANKS, STATE, complete_step, write_rank_manifest
from calm_dist.errors import CompositionError
from launcher.runtime import run_folder
from launcher.runtime.worker_errors import input_error_in
from launcher.train_config import ConfigError


def fake_checkpoint(run_storage: Path, name: str, step: int, world_size: int = 2, ranks_done: int | None = None,
                    mtime: float | None = None) -> Path:
    """A checkpoint folder as Ray Train assembles it from `ranks_done` of `world_size` ranks."""
    folder = run_storage / name
    for rank in range(world_size if ranks_done is None else ranks_done):
        own = run_storage / f".rank{rank}-{name}"  # each rank writes into a directory of its own
        shard = own / f"step-{step:08d}" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        shard.parent.mkdir(parents=True)
        shard.write_bytes(b"x" * (100 + rank))
        if rank == 0:
            (own / STATE).write_text(json.dumps({"step": step, "tag": f"step-{step:08d}", "data": {},
                                                 "world_size": world_size}))
        write_rank_manifest(own, rank)
        for file in own.rglob("*"):
            if file.is_file():
                target = folder / file.relative_to(own)
                target.parent.mkdir(parents=True, exist_ok=True)
                file.rename(target)
    if mtime is not None:
        os.utime(folder, (mtime, mtime))
    return folder


def ray_snapshot(run_storage: Path, *registered: str) -> None:
    entries = [{"checkpoint_dir_name": name, "metrics": {}} for name in registered]
    (run_storage / run_folder.RAY_SNAPSHOT).write_text(json.dumps({
        "checkpoint_results": entries, "latest_checkpoint_result": entries[-1] if entries else None}))


def test_a_checkpoint_is_complete_only_with_every_rank_whole(tmp_path):
    assert complete_step(fake_checkpoint(tmp_path, "checkpoint_a", 4)) == 4
    assert complete_step(fake_checkpoint(tmp_path, "checkpoint_b", 6, ranks_done=1)) is None  # rank 1 missing
    cut = fake_checkpoint(tmp_path, "checkpoint_c", 8)
    shard = next(cut.rglob("zero_pp_rank_1_*"))
    shard.write_bytes(shard.read_bytes()[:10])  # a copy cut short
    assert complete_step(cut) is None
    no_state = fake_checkpoint(tmp_path, "checkpoint_d", 10)
    (no_state / STATE).unlink()
    assert complete_step(no_state) is None
    assert (tmp_path / "checkpoint_a" / RANKS / "1.json").exists()


def test_the_newest_checkpoint_is_the_highest_complete_step_not_the_latest_touched(tmp_path):
    fake_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-03", 30, mtime=1_000)
    fake_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02", 20, mtime=3_000)
    fake_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-04", 40, ranks_done=1, mtime=4_000)
    ray_snapshot(tmp_path, "checkpoint_2026-01-01_00-00-02")  # Ray registered only step 20
    newest = run_folder.newest_checkpoint(tmp_path)
    assert (newest.step, newest.path.name) == (30, "checkpoint_2026-01-01_00-00-03")
    assert [c.step for c in run_folder.complete_checkpoints(tmp_path)] == [20, 30]
    assert run_folder.newest_checkpoint(tmp_path / "nothing") is None


def test_unregistered_checkpoints_are_removed_and_registered_ones_kept(tmp_path):
    for step in (4, 8, 12):
        fake_checkpoint(tmp_path, f"checkpoint_{step:02d}", step)
    fake_checkpoint(tmp_path, "checkpoint_14", 14, ranks_done=1)
    (tmp_path / "notes.txt").write_text("mine")
    ray_snapshot(tmp_path, "checkpoint_08", "checkpoint_12")
    removed = run_folder.remove_unregistered(tmp_path)
    assert sorted(p.name for p in removed) == ["checkpoint_04", "checkpoint_14"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_08", "checkpoint_12"]
    assert (tmp_path / "notes.txt").exists()
    (tmp_path / run_folder.RAY_SNAPSHOT).unlink()
    assert run_folder.remove_unregistered(tmp_path) == []  # without Ray's list, nothing is guessed


@pytest.fixture
def tiny_train_config(tmp_path):
    from launcher.train_config import TrainConfig

    return TrainConfig.model_validate({
        "name": "exp", "models": {"anchor": {"path": "a"}, "augmenting": [{"path": "b"}]},
        "data": {"train": "t.jsonl", "text_field": "text"},
        "training": {"steps": 4, "micro_batch_size": 1, "global_batch_size": 2},
        "ray": {"storage_path": str(tmp_path / "ray")},
    })


class RayStarted(Exception):
    """Raised in place of starting Ray: the driver got past its checks."""


def start_train(config, monkeypatch, resume=False, calls=None):
    import ray

    from launcher.train.command import train

    def refuse(*args, **kwargs):
        if calls is not None:
            calls.append(kwargs)
        raise RayStarted

    monkeypatch.setattr(ray, "init", refuse)
    return train(config, resume=resume)


def test_the_embedded_cluster_is_always_a_new_local_one(tiny_train_config, monkeypatch):
    # ray.init() without an address would attach to a cluster someone started with `ray start` here.
    calls = []
    with pytest.raises(RayStarted):
        start_train(tiny_train_config, monkeypatch, calls=calls)
    assert calls[0]["address"] == "local" and calls[0]["_node_ip_address"] == "127.0.0.1"


def test_a_run_that_failed_before_its_first_checkpoint_blocks_nothing(tiny_train_config, monkeypatch, capsys):
    run_storage = Path(tiny_train_config.ray.storage_path) / "exp"
    fake_checkpoint(run_storage, "checkpoint_a", 2, ranks_done=1)  # cut short by the failure
    ray_snapshot(run_storage)
    with pytest.raises(RayStarted):
        start_train(tiny_train_config, monkeypatch)
    assert not list(run_storage.glob("checkpoint_*")) and not (run_storage / run_folder.RAY_SNAPSHOT).exists()
    with pytest.raises(RayStarted):  # --resume with nothing to resume starts afresh, and says so
        start_train(tiny_train_config, monkeypatch, resume=True)
    assert "run 'exp' has no complete checkpoint" in capsys.readouterr().out


def test_a_run_with_a_checkpoint_needs_resume(tiny_train_config, monkeypatch):
    run_storage = Path(tiny_train_config.ray.storage_path) / "exp"
    folder = fake_checkpoint(run_storage, "checkpoint_a", 2)
    with pytest.raises(ConfigError, match=f"run 'exp' already has a checkpoint at step 2 \\({folder}\\); pass --resume"):
        start_train(tiny_train_config, monkeypatch)
    with pytest.raises(RayStarted):
        start_train(tiny_train_config, monkeypatch, resume=True)
    assert folder.exists()


def test_input_errors_are_found_inside_ray_train_worker_failures():
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    bad_data = DataError("train.jsonl: line 3 has no value (null) in field 'text'")
    failures = {0: UserExceptionWithTraceback(RuntimeError("gloo: connection reset"), "tb0"),
                1: UserExceptionWithTraceback(bad_data, "tb1")}
    found = input_error_in(WorkerGroupError("2 workers failed", failures))
    assert found is bad_data
    chained = RuntimeError("load failed")
    chained.__cause__ = CompositionError("model.safetensors: tensor x cannot be read")
    assert isinstance(input_error_in(WorkerGroupError("1 failed", {0: chained})), CompositionError)
    assert input_error_in(WorkerGroupError("killed", {0: RuntimeError("worker died")})) is None
    assert input_error_in(ControllerError(RuntimeError("placement group timeout"))) is None
