"""Ray is started in one place (launcher/runtime/ray_start.py), and the merge starts it only through the
start_ray it is given: for the partitioned losses (an embedded cluster of `workers` CPUs, shut down after
them) and for shard tasks at an address. A stand-in `ray` module records what would happen."""

from __future__ import annotations

import json
import sys
import types

import pytest
from merge_fixtures import random_tensors, raw_checkpoint

from launcher.runtime.ray_start import start_ray
from launcher.runtime.worker_process_hook import HOOK
from merge.job import run_merge
from merge.merge_config import validate_config


class FakeRay(types.ModuleType):
    def __init__(self, events: list, initialized: bool = False) -> None:
        super().__init__("ray")
        self.events, self.initialized = events, initialized

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **options) -> None:
        self.events.append(("init", options))
        self.initialized = True

    def shutdown(self) -> None:
        self.events.append(("shutdown",))
        self.initialized = False


@pytest.fixture
def events(monkeypatch) -> list:
    """What the stand-in Ray was asked, in order; Ray starts out not running."""
    happened: list = []
    monkeypatch.setitem(sys.modules, "ray", FakeRay(happened))
    # The loopback switch is Ray's own (tests/test_loopback.py checks it for real): not made here.
    monkeypatch.setattr("launcher.runtime.ray_start._loopback_only", lambda on: None)
    return happened


def test_an_embedded_cluster_of_our_own(events):
    # Its processes run our setup hook (launcher.runtime.worker_process_hook), beside the runtime env given,
    # whose own hook would take its place.
    hook = {"worker_process_setup_hook": HOOK}
    local = {"address": "local", "num_cpus": 3, "include_dashboard": False, "runtime_env": hook, "log_to_driver": False}
    assert start_ray(None, num_cpus=3) is True
    assert events == [("init", local)]
    sys.modules["ray"].shutdown()
    assert start_ray("local", num_cpus=3, runtime_env={"env_vars": {"A": "1"}}, log_to_driver=True) is True
    assert events[-1] == ("init", local | {"runtime_env": hook | {"env_vars": {"A": "1"}}, "log_to_driver": True})
    sys.modules["ray"].shutdown()
    assert start_ray(None, num_cpus=3, runtime_env={"worker_process_setup_hook": "mine.setup"}) is True
    assert events[-1] == ("init", local | {"runtime_env": {"worker_process_setup_hook": "mine.setup"}})


def test_a_cluster_is_connected_to_and_not_owned(events):
    assert start_ray("ray://head:10001", num_cpus=3) is False  # a cluster has its own CPUs
    assert events == [("init", {"address": "ray://head:10001", "runtime_env": None, "log_to_driver": False})]


def test_a_running_ray_is_left_as_it_is(events):
    sys.modules["ray"].initialized = True
    assert start_ray(None) is False and start_ray("auto") is False
    assert events == []


@pytest.fixture
def two(tmp_path):
    """Two small checkpoints with tokenizer files, and examples to score them on."""
    for i in range(2):
        raw_checkpoint(tmp_path / f"m{i}", random_tensors(i, {"a.weight": (4, 4)}))
        (tmp_path / f"m{i}" / "tokenizer.json").write_text("{}")
    (tmp_path / "examples.jsonl").write_text(json.dumps({"input": "2+2=", "output": "4"}) + "\n")
    return tmp_path


def recording_start(events: list):
    def start(address, *, num_cpus=None):
        events.append(("start_ray", address, num_cpus))
        return start_ray(address, num_cpus=num_cpus)

    return start


def test_partitioned_losses_get_an_embedded_cluster_shut_down_after_them(two, events, monkeypatch):
    def losses(candidates, examples, spec, log):
        events.append(("losses", [path.name for path, _ in candidates], spec.workers))
        return [1.0, 2.0]

    stand_in = types.ModuleType("merge.execution.partitioned_losses")
    stand_in.check_dtypes = lambda candidates: events.append(("check_dtypes",))
    stand_in.partitioned_losses = losses
    monkeypatch.setitem(sys.modules, "merge.execution.partitioned_losses", stand_in)
    cfg = validate_config({
        "method": "linear", "models": [{"path": str(two / "m0")}, {"path": str(two / "m1")}],
        "weights_from_examples": {"examples": str(two / "examples.jsonl"), "workers": 3},
        "output": {"path": str(two / "out")},
    })
    run_merge(cfg, show_progress=False, log=lambda _: None, start_ray=recording_start(events))
    assert [e[0] for e in events] == ["check_dtypes", "start_ray", "init", "losses", "shutdown"]
    assert events[1] == ("start_ray", None, 3) and events[2][1]["num_cpus"] == 3
    assert events[3] == ("losses", ["m0", "m1"], 3)
    assert (two / "out" / "model.safetensors").exists()  # the shards ran here, without Ray


def test_shard_tasks_at_an_address_connect_and_leave_the_cluster_running(two, events, monkeypatch):
    from merge.execution.local import run_local

    stand_in = types.ModuleType("merge.execution.ray_runner")
    stand_in.run_on_ray = lambda tasks, memory, on_done, progress: (events.append(("shards",)),
                                                                    run_local(tasks, 1, on_done, progress, None))
    monkeypatch.setitem(sys.modules, "merge.execution.ray_runner", stand_in)
    cfg = validate_config({"method": "linear", "models": [{"path": str(two / "m0")}, {"path": str(two / "m1")}],
                           "output": {"path": str(two / "out")}})
    run_merge(cfg, address="auto", show_progress=False, log=lambda _: None, start_ray=recording_start(events))
    assert events == [("start_ray", "auto", None),
                      ("init", {"address": "auto", "runtime_env": None, "log_to_driver": False}), ("shards",)]


def test_without_start_ray_the_merge_needs_a_running_ray(two, events):
    cfg = validate_config({"method": "linear", "models": [{"path": str(two / "m0")}, {"path": str(two / "m1")}],
                           "output": {"path": str(two / "out")}})
    with pytest.raises(RuntimeError, match="Ray, which is not running: pass start_ray"):
        run_merge(cfg, address="auto", show_progress=False, log=lambda _: None)
    assert events == []
