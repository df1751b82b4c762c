"""An embedded cluster is reachable from this machine alone: every process `calm` starts for it (Ray's
GCS, raylet, agents, each worker's gRPC server, the workers' torch.distributed store and gloo) listens
on the loopback only. Ray turns `_node_ip_address="127.0.0.1"` into the machine's network address, so
this once listened on it and on every interface, and torch's env:// store listens on every interface
whatever MASTER_ADDR says. The `calm train` run sampled here also shows what its terminal shows (a Ray
run costs half a minute on 2 cores, so one run checks both)."""

import contextlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.distributed.runs import ENV, ROOT, left_running, tiny_config, train_command
from tests.test_eval import noise_in, terminal_lines

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


def test_calm_train_is_quiet_decodes_its_evaluation_under_zero3_and_listens_on_the_loopback_only(tmp_path):
    """A whole `calm train` (2 workers, gloo, ZeRO-3, an evaluation at its last step), its sockets sampled
    while it runs; what the terminal shows is the run's own lines, the libraries' chatter in the log file."""
    config = tiny_config(tmp_path, steps=2, checkpoint_every=2)
    marker = f"calm-test-{uuid.uuid4().hex}"
    command = train_command(config, "--set", f"data.eval={tmp_path / 'assets/eval.jsonl'}", "--set",
                            "training.eval_every=2", "--set", "training.eval_samples=8",
                            "--set", "training.eval_max_new_tokens=3")
    run = subprocess.Popen(command, env={**ENV, "CALM_TEST_RUN": marker}, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, str, int]] = set()
    try:
        while run.poll() is None:
            seen |= _listening(run.pid)
            time.sleep(1.0)  # servers listen for the whole run; sampling more often slows it on 2 cores
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

    lines = terminal_lines(subprocess.CompletedProcess(command, run.returncode, output, ""))
    assert noise_in(lines) == [], "\n".join(noise_in(lines))
    assert any(line.startswith("step 2 ") and "exact_match" in line for line in lines)
    assert any(line.startswith("done: 2 steps") for line in lines)
    assert lines[-1].startswith("log: ")
    log = Path(lines[-1][5:]).read_text()
    assert "Started a local Ray instance" in log  # the driver's chatter went there
    assert "tokenizing" in log  # and the workers'
    metrics = [json.loads(line) for line in (tmp_path / "out/tiny-demo/metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= metrics[-1]["eval_exact_match"] <= 1.0 and metrics[-1]["eval_loss"] > 0


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
