"""An embedded cluster is reachable from this machine alone: every process `calm` starts for it (Ray's
GCS, raylet, agents, each worker's gRPC server, the workers' torch.distributed store and gloo) listens
on the loopback only. Ray turns `_node_ip_address="127.0.0.1"` into the machine's network address, so
this once listened on it and on every interface, and torch's env:// store listens on every interface
whatever MASTER_ADDR says."""

import contextlib
import json
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.distributed.runs import ENV, ROOT, left_running, tiny_config, train_command

pytestmark = pytest.mark.distributed

PROBE = """
import json, os, psutil, ray
from launcher.runtime.ray_start import start_ray

assert start_ray(None, num_cpus=1)

@ray.remote
class Echo:
    def ping(self):
        return ray.util.get_node_ip_address()

actor = Echo.remote()
node_ip = ray.get(actor.ping.remote())
tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
listening = []
for process in tree:
    try:
        listening += [(process.name(), c.laddr.ip) for c in process.net_connections("inet") if c.status == "LISTEN"]
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps({"node_ip": node_ip, "listening": listening}))
"""


def test_an_embedded_cluster_listens_on_the_loopback_only():
    result = subprocess.run([sys.executable, "-c", PROBE], env=ENV, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["node_ip"] == "127.0.0.1"
    assert len(report["listening"]) >= 5  # GCS, raylet, agents, the driver's and the actor's gRPC servers
    assert _elsewhere(report["listening"]) == []


def test_calm_train_on_an_embedded_cluster_listens_on_the_loopback_only(tmp_path):
    """A whole `calm train` (2 workers, gloo, ZeRO-3), its sockets sampled while it runs."""
    config = tiny_config(tmp_path, steps=4, checkpoint_every=2)
    marker = f"calm-test-{uuid.uuid4().hex}"
    run = subprocess.Popen(train_command(config), env={**ENV, "CALM_TEST_RUN": marker}, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, str, int]] = set()
    try:
        while run.poll() is None:
            seen |= _listening(run.pid)
            time.sleep(0.2)
        output = run.stdout.read()
    finally:
        if run.poll() is None:
            run.kill()
        run.wait(timeout=60)
    assert run.returncode == 0, output[-3000:]
    assert left_running(marker) == []
    # The store's port is rank 0's (a worker process); at least Ray's servers and the store were seen.
    assert len({port for _, _, port in seen}) >= 6, seen
    assert any(name.startswith("ray::") for name, _, _ in seen), seen
    assert _elsewhere([(name, ip) for name, ip, _ in seen]) == []


def _listening(pid: int) -> set[tuple[str, str, int]]:
    found = set()
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for process in tree:
        with contextlib.suppress(psutil.Error):
            found |= {(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN}
    return found


def _elsewhere(listening: list) -> list:
    return [(name, ip) for name, ip in listening if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
