"""A run's checkpoints on disk, decided by checkpoints rather than folders, and the driver's handling of
worker errors: all without starting Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from calm_dist.data.records import DataError
from calm_dist.distributed.checkpoint_layout import RANKS, STATE, complete_step, write_rank_manifest
from calm_dist.errors import CompositionError, InputError
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
            # The data position of tiny_train_config's runs (seed 0, 2 anchor ranks of micro-batch 1).
            data = {"epoch": 0, "next_batch": step, "seed": 0, "world_size": 2, "micro_batch_size": 1}
            (own / STATE).write_text(json.dumps({"step": step, "tag": f"step-{step:08d}", "data": data,
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


def ray_name(second: int) -> str:
    """A checkpoint folder's name as Ray Train makes it (the time to the microsecond)."""
    return f"checkpoint_2026-01-01_00-00-{second:02d}.000000"


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
    fake_checkpoint(tmp_path, ray_name(3), 30, mtime=1_000)
    fake_checkpoint(tmp_path, ray_name(2), 20, mtime=3_000)
    fake_checkpoint(tmp_path, ray_name(4), 40, ranks_done=1, mtime=4_000)
    ray_snapshot(tmp_path, ray_name(2))  # Ray registered only step 20
    newest = run_folder.newest_checkpoint(tmp_path)
    assert (newest.step, newest.path.name, newest.source) == (30, ray_name(3), str(tmp_path / ray_name(3)))
    assert [c.step for c in run_folder.complete_checkpoints(tmp_path)] == [20, 30]
    assert run_folder.newest_checkpoint(tmp_path / "nothing") is None


def test_unregistered_checkpoints_of_ours_are_removed_and_everything_else_kept(tmp_path):
    for second, step in ((4, 4), (8, 8), (12, 12)):
        fake_checkpoint(tmp_path, ray_name(second), step)
    fake_checkpoint(tmp_path, ray_name(14), 14, ranks_done=1)
    fake_checkpoint(tmp_path, "checkpoint_best", 4)  # the user's copy, named by the user
    fake_checkpoint(tmp_path, ray_name(16), 16, ranks_done=1)
    (tmp_path / ray_name(16) / "notes.txt").write_text("mine")  # a file no checkpoint of ours holds
    unreadable = fake_checkpoint(tmp_path, ray_name(18), 18)
    (unreadable / STATE).write_text('{"step": 18')  # cannot be read: kept, whatever it is
    (tmp_path / "notes.txt").write_text("mine")
    ray_snapshot(tmp_path, ray_name(8), ray_name(12))
    assert run_folder.remove_unregistered(tmp_path) == [ray_name(4), ray_name(14)]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*") if p.is_dir()) == [
        ray_name(8), ray_name(12), ray_name(16), ray_name(18), "checkpoint_best"]
    assert (tmp_path / "notes.txt").exists()
    (tmp_path / run_folder.RAY_SNAPSHOT).unlink()
    assert run_folder.remove_unregistered(tmp_path) == []  # without Ray's list, nothing is guessed


def test_why_a_checkpoint_is_not_complete_is_told(tmp_path):
    from calm_dist.distributed.checkpoint_layout import inspect_checkpoint

    cut = inspect_checkpoint(fake_checkpoint(tmp_path, "a", 4, ranks_done=1))
    assert cut.cut_short and cut.problem == "incomplete: missing ranks/1.json"
    shard_cut = fake_checkpoint(tmp_path, "b", 4)
    shard = next(shard_cut.rglob("zero_pp_rank_1_*"))
    shard.write_bytes(b"x" * 10)
    found = inspect_checkpoint(shard_cut)
    assert found.cut_short and found.problem == (
        "incomplete: cut short: step-00000004/zero_pp_rank_1_mp_rank_00_model_states.pt (10 of 101 bytes)")
    older = fake_checkpoint(tmp_path, "c", 4)
    (older / STATE).write_text(json.dumps({"step": 4, "tag": "step-00000004"}))  # before world_size was saved
    found = inspect_checkpoint(older)
    assert not found.cut_short and found.problem.startswith("not a checkpoint this version writes")
    grown = fake_checkpoint(tmp_path, "d", 4)
    next(grown.rglob("zero_pp_rank_0_*")).write_bytes(b"x" * 500)
    assert not inspect_checkpoint(grown).cut_short


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
    assert calls[0]["address"] == "local"  # its loopback-only binding: tests/test_loopback.py


def test_a_run_that_failed_before_its_first_checkpoint_blocks_nothing(tiny_train_config, monkeypatch, capsys):
    run_storage = Path(tiny_train_config.ray.storage_path) / "exp"
    fake_checkpoint(run_storage, ray_name(2), 2, ranks_done=1)  # cut short by the failure
    fake_checkpoint(run_storage, ray_name(3), 2, ranks_done=0)  # an upload that never began
    only_deepspeed = run_storage / ray_name(4) / "step-00000004"  # DeepSpeed's files came first
    only_deepspeed.mkdir(parents=True)
    (only_deepspeed / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    for name in ("latest", "zero_to_fp32.py", "zero_to_torch.py"):
        (only_deepspeed.parent / name).write_text("x")
    ray_snapshot(run_storage)
    with pytest.raises(RayStarted):
        start_train(tiny_train_config, monkeypatch)
    assert not list(run_storage.glob("checkpoint_*")) and not (run_storage / run_folder.RAY_SNAPSHOT).exists()
    with pytest.raises(RayStarted):  # --resume with nothing to resume starts afresh, and says so
        start_train(tiny_train_config, monkeypatch, resume=True)
    assert "run 'exp' has no checkpoint yet" in capsys.readouterr().out


def test_a_run_with_a_checkpoint_needs_resume(tiny_train_config, monkeypatch):
    run_storage = Path(tiny_train_config.ray.storage_path) / "exp"
    folder = fake_checkpoint(run_storage, ray_name(2), 2)
    with pytest.raises(ConfigError, match=f"run 'exp' already has a checkpoint at step 2 \\({folder}\\); pass --resume"):
        start_train(tiny_train_config, monkeypatch)
    with pytest.raises(RayStarted):
        start_train(tiny_train_config, monkeypatch, resume=True)
    assert folder.exists()


def test_a_resume_under_other_batch_sizes_is_refused_before_ray_starts(tiny_train_config, monkeypatch):
    run_storage = Path(tiny_train_config.ray.storage_path) / "exp"
    folder = fake_checkpoint(run_storage, ray_name(2), 2)
    other = tiny_train_config.model_copy(update={"training": tiny_train_config.training.model_copy(
        update={"micro_batch_size": 2, "global_batch_size": 4})})
    with pytest.raises(DataError) as refused:
        start_train(other, monkeypatch, resume=True)
    assert str(refused.value) == (
        f"{folder}/{STATE}: cannot resume the data position: it was saved with micro_batch_size=1 but this run "
        "has micro_batch_size=2; resume with the same data and sharding, or start afresh")
    assert isinstance(refused.value, InputError)  # exit 2, never retried


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def test_resume_never_deletes_a_checkpoint_it_cannot_use(tiny_train_config, monkeypatch):
    from calm_dist.distributed import checkpoint_layout

    run_storage = Path(tiny_train_config.ray.storage_path) / "exp"
    # A registered checkpoint with a shard that no longer has its size (damaged storage, a bad copy).
    cut = fake_checkpoint(run_storage, ray_name(2), 2)
    shard = next(cut.rglob("zero_pp_rank_1_*"))
    shard.write_bytes(shard.read_bytes()[:10])
    ray_snapshot(run_storage, ray_name(2))
    before = files_under(run_storage)
    with pytest.raises(run_folder.CheckpointError) as refused:
        start_train(tiny_train_config, monkeypatch, resume=True)
    assert f"{cut}: incomplete: cut short: step-00000002/zero_pp_rank_1_mp_rank_00_model_states.pt (10 of 101 " \
           "bytes), and Ray Train registered it complete" in str(refused.value)
    assert "Nothing was deleted" in str(refused.value) and isinstance(refused.value, InputError)  # exit 2
    with pytest.raises(run_folder.CheckpointError):  # nor does a fresh start
        start_train(tiny_train_config, monkeypatch)
    assert files_under(run_storage) == before

    # A checkpoint written by an older version (no world size).
    older = fake_checkpoint(run_storage, ray_name(4), 4)
    (older / STATE).write_text(json.dumps({"step": 4, "tag": "step-00000004"}))
    with pytest.raises(run_folder.CheckpointError, match=f"{older}: not a checkpoint this version writes"):
        start_train(tiny_train_config, monkeypatch, resume=True)

    # Shared storage failing to read one, beside a complete older one: which is newest cannot be told.
    fake_checkpoint(run_storage, ray_name(1), 1)
    failing = run_storage / ray_name(4) / STATE
    read_json = checkpoint_layout.read_json

    def flaky(path, filesystem=None):
        if str(path) == str(failing):
            raise OSError(5, "Input/output error")
        return read_json(path, filesystem)

    monkeypatch.setattr(checkpoint_layout, "read_json", flaky)
    with pytest.raises(run_folder.CheckpointError, match=f"{older}: cannot be read: .*Input/output error"):
        start_train(tiny_train_config, monkeypatch, resume=True)
    assert sorted(p.name for p in run_storage.glob("checkpoint_*") if p.is_dir()) == [
        ray_name(1), ray_name(2), ray_name(4)]


def test_resume_with_only_uploads_cut_short_deletes_nothing_and_says_how_to_start_afresh(tiny_train_config,
                                                                                          monkeypatch):
    run_storage = Path(tiny_train_config.ray.storage_path) / "exp"
    leftover = fake_checkpoint(run_storage, ray_name(2), 2, ranks_done=1)
    with pytest.raises(run_folder.CheckpointError, match=f"{leftover}: an upload cut short.*run without --resume"):
        start_train(tiny_train_config, monkeypatch, resume=True)
    assert leftover.exists()


def test_a_fresh_start_removes_only_what_an_attempt_of_ours_provably_left(tiny_train_config, monkeypatch):
    run_storage = Path(tiny_train_config.ray.storage_path) / "exp"
    mine = fake_checkpoint(run_storage, "checkpoint_mine", 2, ranks_done=1)  # named by the user
    with pytest.raises(run_folder.CheckpointError, match=f"{mine}: incomplete: missing ranks/1.json, and not "
                       "named as Ray Train names checkpoints"):
        start_train(tiny_train_config, monkeypatch)
    mine.rename(run_storage.parent / "elsewhere")
    kept = fake_checkpoint(run_storage, ray_name(2), 2, ranks_done=1)
    (kept / "my-notes").mkdir()
    (kept / "my-notes" / "todo.txt").write_text("mine")
    with pytest.raises(run_folder.CheckpointError, match="holds files no checkpoint holds \\(my-notes/todo.txt\\)"):
        start_train(tiny_train_config, monkeypatch)
    assert (kept / "my-notes" / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("name", [".", "..", "a/b", ""])
def test_a_run_name_is_one_plain_folder_name(tmp_path, name):
    import yaml

    from launcher.train_config import load_config

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "models": {"anchor": {"path": "a"}, "augmenting": [{"path": "b"}]},
        "data": {"train": "t.jsonl", "text_field": "text"},
        "training": {"steps": 4, "micro_batch_size": 1, "global_batch_size": 2}}))
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    problems = str(refused.value).splitlines()[1:]
    assert len(problems) == 1 and problems[0].startswith("  name: "), problems
    if name in (".", ".."):
        assert f"name: {name!r} is not a run name" in problems[0]


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
