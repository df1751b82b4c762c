"""`calm submit` against a real Ray head node on 127.0.0.1 with token authentication, as Ray 2.60
clusters run by default: a tiny training job through the real Jobs API, to success.

The head node is this test's own: its own ports, temp dir and token (never ~/.ray/auth_token, which
other clusters on the machine may use), started with `--block` in a process group of its own and
stopped by signalling that group, never with `ray stop` (which would stop every cluster here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.distributed.runs import ENV, ROOT, tiny_config

pytestmark = pytest.mark.distributed


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def group_processes(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


@pytest.fixture(scope="module")
def head_node():
    """(dashboard address, token): a Ray head with its dashboard and token authentication on."""
    temp_dir = Path(tempfile.mkdtemp(prefix="calm-ray-"))  # short: Ray's socket paths must stay short
    token = "calm-test-" + os.urandom(16).hex()
    (temp_dir / "token").write_text(token)
    gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = free_ports(7)
    env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp_dir / "token"),
           # The job's entrypoint runs `python` from the head's PATH: this interpreter, with torch.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           # On SIGTERM the head first asks its GCS, which got the signal too, to drain the node, and waits
           # out 30 s for the answer; this node serves no traffic to drain, so it stops at once.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_AUTH_TOKEN", None)
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
               "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
               "--metrics-export-port", str(metrics), "--num-cpus", "3", "--temp-dir", str(temp_dir / "ray")]
    log = (temp_dir / "head.log").open("w")
    head = subprocess.Popen(command, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (temp_dir / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head node's dashboard did not come up in 120 s"
            try:
                if requests.get(f"{address}/api/version", timeout=2,
                                headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield address, token
    finally:
        # Everything `ray start` launched (GCS, raylet, dashboard, workers) either shares its process
        # group or is a descendant; --block tears the node down on SIGTERM.
        members = {p.pid: p for p in group_processes(head.pid)}
        with contextlib.suppress(psutil.NoSuchProcess):
            members.update({p.pid: p for p in psutil.Process(head.pid).children(recursive=True)})
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        _, alive = psutil.wait_procs(list(members.values()), timeout=30)
        for proc in alive:
            proc.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"processes of the head node outlived it: {[(p.pid, p.name()) for p in alive]}"


def submit(config: Path, address: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    """`calm submit` as a user runs it, with `home` as the home folder (where ~/.ray/auth_token lives)."""
    run_env = {**ENV, "HOME": str(home), "HF_HUB_OFFLINE": "1", **env}
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        if name not in env:
            run_env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "launcher.cli", "submit", str(config), "--address", address,
                           "--working-dir", str(config.parent)], env=run_env, cwd=ROOT, timeout=900,
                          capture_output=True, text=True)


@pytest.mark.timeout(900)
def test_submit_a_training_job_to_a_token_authenticated_head_node(head_node, tmp_path):
    address, token = head_node
    # The anchor is a tied GPT-2 as hubs publish it: partitioned loading resolves its names and trains
    # with its head and embedding one parameter.
    config = tiny_config(tmp_path, steps=2, checkpoint_every=2, hub_gpt2_anchor=True)
    raw = yaml.safe_load(config.read_text())
    raw["ray"]["runtime_env"] = {"env_vars": {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
                                              "TOKENIZERS_PARALLELISM": "false"}}
    job = tmp_path / "job"  # the uploaded working directory: just the config (paths in it are absolute)
    job.mkdir()
    (job / "run.yaml").write_text(yaml.safe_dump(raw))
    config = job / "run.yaml"

    # No token anywhere: one line saying what is missing.
    empty_home = tmp_path / "home-without-token"
    empty_home.mkdir()
    refused = submit(config, address, empty_home)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"calm submit: error: ray.address: the cluster at {address} requires a token (Ray token authentication) "
        "and none was found: run `ray get-auth-token` on the head node and set RAY_AUTH_TOKEN to it, point "
        "RAY_AUTH_TOKEN_PATH at a file holding it, or save it as ~/.ray/auth_token")
    assert "Traceback" not in refused.stderr

    # A wrong token: refused, naming where it came from.
    wrong = submit(config, address, empty_home, RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode == 2
    assert f"the cluster at {address} refused the token from RAY_AUTH_TOKEN (HTTP 403)" in wrong.stderr

    # The token in ~/.ray/auth_token, where `ray` itself looks: the job runs to success.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token + "\n")
    done = submit(config, address, home)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "job raysubmit_" in done.stdout and done.stdout.rstrip().endswith("SUCCEEDED")
    assert (tmp_path / "out" / raw["name"] / "composition" / "composition.safetensors").exists()
