"""Checkpoints on object storage (`ray.storage_path: s3://...`), against a real S3-compatible server
(moto) that each test starts on 127.0.0.1 and stops: found, checked and tidied through the storage's
own filesystem, and a `calm train` that checkpoints there and resumes from there."""

import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import pytest
import yaml

from calm_dist.distributed.checkpoint_layout import STATE, checkpoint_step
from launcher.runtime import run_folder
from launcher.train_config import ConfigError
from tests.distributed.runs import ENV, ROOT, tiny_config, train
from tests.test_run_folder import fake_checkpoint, ray_name, ray_snapshot

BUCKET = "calm"
# An AWS SDK with no endpoint, credentials or region of its own: nothing reaches past the test's server.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class S3:
    endpoint: str  # host:port
    filesystem: pyarrow.fs.S3FileSystem

    def uri(self, path: str) -> str:
        """A storage URI that carries its endpoint, as a config on a cluster would."""
        return f"s3://{BUCKET}/{path}?endpoint_override={self.endpoint}&scheme=http"


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        # moto keeps its buckets per process, not per server: start from none.
        with urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")):
            pass
        filesystem = pyarrow.fs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                                             allow_bucket_creation=True)
        filesystem.create_dir(BUCKET)
        yield S3(f"{host}:{port}", filesystem)
    finally:
        server.stop()


def upload(s3: S3, local: Path, path: str) -> None:
    pyarrow.fs.copy_files(str(local), f"{BUCKET}/{path}", destination_filesystem=s3.filesystem)


def folders(s3: S3, path: str) -> list[str]:
    infos = s3.filesystem.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/{path}", allow_not_found=True))
    return sorted(info.base_name for info in infos
                  if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"))


def test_checkpoints_on_s3_are_found_checked_and_tidied_through_its_filesystem(s3, tmp_path, monkeypatch):
    local = tmp_path / "made-here"
    fake_checkpoint(local, ray_name(2), 2)
    fake_checkpoint(local, ray_name(4), 4)
    fake_checkpoint(local, ray_name(6), 6, ranks_done=1)  # an upload cut short
    ray_snapshot(local, ray_name(2), ray_name(4))
    upload(s3, local, "runs/exp")
    shard = next(p for p in (local / ray_name(4)).rglob("zero_pp_rank_1_*"))
    # A copy of step 4 with rank 1's shard cut short, never registered.
    pyarrow.fs.copy_files(str(local / ray_name(4)), f"{BUCKET}/runs/exp/{ray_name(8)}",
                          destination_filesystem=s3.filesystem)
    with s3.filesystem.open_output_stream(f"{BUCKET}/runs/exp/{ray_name(8)}/{shard.relative_to(local / ray_name(4))}") as out:
        out.write(b"x" * 10)

    storage = run_folder.open_run_storage(s3.uri("runs"), "exp")
    assert storage.ray_storage_path == s3.uri("runs")  # Ray Train gets the URI itself, endpoint and all
    assert storage.show() == f"s3://{BUCKET}/runs/exp"
    newest = run_folder.newest_checkpoint(storage)
    assert [c.step for c in run_folder.complete_checkpoints(storage)] == [2, 4]
    assert newest.path == f"s3://{BUCKET}/runs/exp/{ray_name(4)}"
    assert newest.source == f"s3://{BUCKET}/runs/exp/{ray_name(4)}?endpoint_override={s3.endpoint}&scheme=http"

    # What a worker does with it: read its step where it lies, then download it.
    import ray.train

    checkpoint = ray.train.Checkpoint(newest.source)
    assert checkpoint_step(checkpoint.path, checkpoint.filesystem) == 4
    with checkpoint.as_directory() as directory:
        assert json.loads((Path(directory) / STATE).read_text())["step"] == 4

    with pytest.raises(ConfigError, match=f"already has a checkpoint at step 4 \\(s3://{BUCKET}/runs/exp/"):
        run_folder.starting_point(storage, "exp", resume=False)
    assert run_folder.starting_point(storage, "exp", resume=True) == newest
    assert run_folder.remove_unregistered(storage) == [ray_name(6), ray_name(8)]
    assert folders(s3, "runs/exp") == [ray_name(2), ray_name(4)]

    # The endpoint may come from the environment instead (then every node needs it there).
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3.endpoint}")
    plain = run_folder.open_run_storage(f"s3://{BUCKET}/runs", "exp")
    assert run_folder.newest_checkpoint(plain).step == 4


def test_a_fresh_start_on_s3_tidies_only_what_an_attempt_of_ours_left(s3, tmp_path):
    local = tmp_path / "made-here"
    fake_checkpoint(local, ray_name(2), 2, ranks_done=1)
    ray_snapshot(local)
    fake_checkpoint(tmp_path / "mine", "checkpoint_mine", 2, ranks_done=1)
    upload(s3, local, "runs/exp")
    storage = run_folder.open_run_storage(s3.uri("runs"), "exp")

    with pytest.raises(run_folder.CheckpointError, match=f"{ray_name(2)}: an upload cut short"):
        run_folder.starting_point(storage, "exp", resume=True)
    assert folders(s3, "runs/exp") == [ray_name(2)]

    upload(s3, tmp_path / "mine", "runs/exp")
    with pytest.raises(run_folder.CheckpointError, match=f"s3://{BUCKET}/runs/exp/checkpoint_mine: incomplete"):
        run_folder.starting_point(storage, "exp", resume=False)
    assert folders(s3, "runs/exp") == [ray_name(2), "checkpoint_mine"]

    s3.filesystem.delete_dir(f"{BUCKET}/runs/exp/checkpoint_mine")
    assert run_folder.starting_point(storage, "exp", resume=False) is None
    assert folders(s3, "runs/exp") == []
    assert s3.filesystem.get_file_info(f"{BUCKET}/runs/exp/{run_folder.RAY_SNAPSHOT}").type == \
        pyarrow.fs.FileType.NotFound


@pytest.mark.parametrize("value", ["s3://", "://bucket/runs", "s 3://bucket", ""])
def test_a_storage_path_is_a_folder_or_a_uri(tmp_path, value):
    from launcher.train_config import load_config

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "exp", "models": {"anchor": {"path": "a"}, "augmenting": [{"path": "b"}]},
        "data": {"train": "t.jsonl", "text_field": "text"},
        "training": {"steps": 4, "micro_batch_size": 1, "global_batch_size": 2}, "ray": {"storage_path": value}}))
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    problems = str(refused.value).splitlines()[1:]
    assert len(problems) == 1 and problems[0].startswith("  ray.storage_path: "), problems
    assert load_config(config, {"ray.storage_path": "s3://bucket/runs?endpoint_override=h:9000"}).ray.storage_path \
        == "s3://bucket/runs?endpoint_override=h:9000"  # a URI is left as written, query and all


@pytest.mark.distributed
@pytest.mark.timeout(900)  # two runs of about a minute each
def test_training_checkpoints_to_s3_and_resumes_from_there(s3, tmp_path, monkeypatch):
    for key, value in AWS_ENV.items():  # the credentials; the endpoint is in the URI
        monkeypatch.setitem(ENV, key, value)
    config = tiny_config(tmp_path, steps=2, checkpoint_every=2)
    raw = yaml.safe_load(config.read_text())
    raw["ray"]["storage_path"] = s3.uri("runs")
    config.write_text(yaml.safe_dump(raw))
    storage = run_folder.open_run_storage(s3.uri("runs"), "on-s3")

    train(config, "--set", "name=on-s3")  # and no process of it is left running
    assert [c.step for c in run_folder.complete_checkpoints(storage)] == [2]
    resumed = train(config, "--set", "name=on-s3", "--set", "training.steps=4", "--resume")
    assert [int(s) for s in re.findall(r"step (\d+)  loss", resumed.stdout)] == [3, 4]  # from step 2, not 0
    assert [c.step for c in run_folder.complete_checkpoints(storage)] == [2, 4]

    # The composition is exported to output_dir, a local folder; nothing went to a local "s3:" folder.
    manifest = json.loads((tmp_path / "out/on-s3/composition/composition.json").read_text())
    assert manifest["trained_steps"] == 4
    assert not (ROOT / "s3:").exists() and not list(tmp_path.rglob("s3:"))
