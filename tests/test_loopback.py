"""An embedded cluster is reachable from this machine alone: every process `calm` starts for it (Ray's
GCS, raylet, agents, each worker's gRPC server) listens on the loopback only. Ray turns
`_node_ip_address="127.0.0.1"` into the machine's network address, so this once listened on it and on
every interface."""

import json
import subprocess
import sys

import pytest

from tests.distributed.runs import ENV, ROOT

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
    elsewhere = [(name, ip) for name, ip in report["listening"] if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert elsewhere == []
