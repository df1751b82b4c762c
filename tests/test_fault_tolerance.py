"""Fault tolerance of `calm train`: SIGKILL one Ray Train worker mid-run; Ray Train restarts the worker
group, every worker resumes from the run's last checkpoint, and the run finishes with the same
composition parameters as an uninterrupted run.

Two full 2-worker runs (about a minute each on 2 cores), so one test checks everything.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launcher.runtime.run_folder import newest_checkpoint
from tests.distributed.runs import ENV, ROOT, assert_same_composition, tiny_config, train_command

pytestmark = pytest.mark.distributed
STEPS, CHECKPOINT_EVERY = 24, 4  # ~0.25 s a step here: the kill lands well before the last step


def command(config: Path, name: str) -> list[str]:
    return train_command(config, "--set", f"name={name}")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def is_train_worker(proc: psutil.Process) -> bool:
    """Ray retitles an actor's process `ray::RayTrainWorker...` once the actor is created."""
    try:
        return "RayTrainWorker" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def registered_checkpoint_step(run_storage: Path) -> int | None:
    """Step of the latest checkpoint Ray Train's controller has registered (not merely one being
    written), from the snapshot it keeps next to the checkpoints."""
    try:
        snapshot = json.loads((run_storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return None
    latest = snapshot.get("latest_checkpoint_result")
    if not latest or not (run_storage / latest["checkpoint_dir_name"] / "training_state.json").exists():
        return None
    return latest["metrics"]["step"]


@pytest.mark.timeout(900)
def test_run_with_a_killed_worker_recovers_and_equals_an_uninterrupted_run(tmp_path):
    config = tiny_config(tmp_path, steps=STEPS, checkpoint_every=CHECKPOINT_EVERY, max_failures=2)

    straight = subprocess.run(command(config, "straight"), env=ENV, cwd=ROOT, timeout=600,
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    # The killed run. Its Ray (GCS, raylet, workers) is an embedded cluster started by the driver, so
    # every process of it descends from the driver: other Ray clusters on this machine are never touched.
    log_path = tmp_path / "killed.log"
    run_storage = tmp_path / "ray" / "killed"
    seen: dict[int, psutil.Process] = {}  # every descendant of the driver, to check none outlives it
    workers_before: set[int] = set()
    workers_after: set[int] = set()
    killed_pid = killed_at_step = None
    with log_path.open("w") as log:
        driver = subprocess.Popen(command(config, "killed"), env=ENV, cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while driver.poll() is None:
                assert time.monotonic() < deadline, "the killed run did not finish in 600 s"
                for proc in descendants(driver.pid):
                    seen.setdefault(proc.pid, proc)
                    if is_train_worker(proc):
                        (workers_before if killed_pid is None else workers_after).add(proc.pid)
                if killed_pid is None and workers_before:
                    step = registered_checkpoint_step(run_storage)
                    if step is not None:
                        killed_pid, killed_at_step = min(workers_before), step
                        os.kill(killed_pid, signal.SIGKILL)
                time.sleep(0.1)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
            for proc in seen.values():  # on failure: leave nothing of this run behind
                if driver.returncode != 0 and proc.is_running():
                    proc.kill()
    output = log_path.read_text(errors="replace")
    assert driver.returncode == 0, output[-5000:]

    # The kill landed mid-run, and Ray Train restarted the worker group: new worker processes ran
    # after it, and the killed one is not among them.
    assert killed_pid is not None, "no checkpoint was registered before the run ended"
    assert killed_at_step < STEPS
    assert workers_after - workers_before, f"no new RayTrainWorker after killing {killed_pid}"
    assert killed_pid not in workers_after
    # The new workers resumed from a checkpoint, not from scratch. Rank 0 posts every step's line to
    # the driver in each attempt: step 1 shows once, and where the count goes back (steps done after
    # the checkpoint and before the kill, done again) it restarts just after a checkpoint's step.
    logged = [int(s) for s in re.findall(r"step (\d+)  loss", output)]
    assert logged.count(1) == 1, logged
    assert sorted(set(logged)) == list(range(1, STEPS + 1)), logged
    for before, after in zip(logged, logged[1:], strict=False):
        if after <= before:
            assert (after - 1) % CHECKPOINT_EVERY == 0 and after > killed_at_step, logged

    # Same composition parameters, bitwise: the resumed workers restore optimizer moments, schedule,
    # RNG state and data position from the checkpoint, and gloo reduces in a fixed order.
    assert_same_composition(tmp_path / "out", "straight", "killed", trained_steps=STEPS)
    # Two checkpoints kept after the restart too (an upload cut short by the kill is not left behind), the
    # newest at the last step.
    folders = [p for p in run_storage.glob("checkpoint_*") if p.is_dir()]
    assert len(folders) == 2, folders
    assert newest_checkpoint(run_storage).step == STEPS

    # The driver's embedded Ray went with it: no process of the killed run is left.
    stray_deadline = time.monotonic() + 30
    while (alive := [p for p in seen.values() if p.is_running()]) and time.monotonic() < stray_deadline:
        time.sleep(0.5)
    assert not alive, [(p.pid, p.name()) for p in alive]
