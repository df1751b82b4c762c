"""An embedded Ray cluster leaves nothing running when its command ends, even a worker that hangs on its
way out (as a Ray Train controller that used S3 once did: pyarrow's S3 finalisation deadlocked at exit);
its processes run our setup hook first (launcher.runtime.worker_process_hook)."""

import os
import subprocess
import sys
import time

from tests.distributed.runs import ENV, ROOT

# A script that starts an embedded cluster, whose one actor exits by itself (as Ray Train's controller
# does when its run is done) and then never finishes exiting. It prints the actor's pid and ends without
# stopping Ray itself: what runs at exit must.
SCRIPT = """
import os, time
import ray
from launcher.runtime.ray_start import start_ray
start_ray(None, num_cpus=1)

@ray.remote(num_cpus=0)
class HangsOnExit:
    def __init__(self):
        import atexit
        atexit.register(time.sleep, 3600)
    def pid(self):
        return os.getpid()
    def drops(self, message):
        import logging
        from launcher.runtime.worker_process_hook import CLEANER_LOGGER
        return not logging.getLogger(CLEANER_LOGGER).filter(logging.makeLogRecord({"msg": message}))
    def leave(self):
        ray.actor.exit_actor()

actor = HangsOnExit.remote()
print(*ray.get([actor.drops.remote("Failed to query Ray Train Controller actor state. State API may be "
                                   "temporarily unavailable. Continuing to monitor."),
                actor.drops.remote("Detected that the Ray Train controller actor is dead.")]), flush=True)
print(ray.get(actor.pid.remote()), flush=True)
actor.leave.remote()
time.sleep(2)  # it is in its atexit handler now, no longer one of the raylet's workers
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited: only its parent has yet to reap it
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_worker_that_hangs_on_exit_is_killed_when_the_embedded_cluster_stops():
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    # The placement-group cleaner's failures to reach the State API (which an embedded cluster has not) are
    # dropped in the actor's own process; what else it says is not.
    assert result.stdout.split()[:2] == ["True", "False"], result.stdout
    pid = int(result.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        os.kill(pid, 9)  # the test fails, and leaves no orphan
        raise AssertionError(f"the actor (pid {pid}) outlived its embedded cluster")
    assert f"ray: killed ray::HangsOnExit (pid {pid})" in result.stderr
