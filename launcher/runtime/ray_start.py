"""Starting Ray, in one place: an embedded local cluster of this process's own, or a connection to one.

Every command that runs on Ray (train, eval, merge) starts it here, so they agree on what an address
means: None or 'local' is a cluster of our own, reachable only from this machine and never one that
`ray start` left running here; anything else ('auto', 'ray://head:10001', 'host:6379') is connected to.
Ray is imported only when called: `calm --help` and a merge without Ray never load it.

`stop_ray` is the other end: it shuts Ray down, and an embedded cluster's processes that have not
exited after a grace period are killed, so a command leaves nothing running. (A Ray Train controller
that wrote checkpoints to S3 was once found hung in interpreter teardown an hour after its run ended:
pyarrow's S3 finalisation at exit can deadlock, apache/arrow#50188. Ray leaves such a worker behind
when its node shuts down.)
"""

from __future__ import annotations

import atexit
import os
import sys


def start_ray(
    address: str | None,
    *,
    num_cpus: int | None = None,
    runtime_env: dict | None = None,
    log_to_driver: bool = False,
) -> bool:
    """Start or join Ray for this process; whether it started a cluster this process owns (the caller
    shuts that one down with ray.shutdown() when done). If Ray already runs in this process, nothing
    is started and the answer is False. num_cpus sizes an embedded cluster (None: every CPU here); a
    cluster connected to has its own."""
    import ray

    if ray.is_initialized():
        return False
    embedded = address is None or address == "local"
    _loopback_only(embedded)
    if embedded:
        import psutil

        from launcher.runtime.worker_process_hook import HOOK

        before = {child.pid for child in psutil.Process().children()}
        # No dashboard, so no State API: the hook drops the warnings of what cannot work without it.
        # A setup hook of the user's own takes its place.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env={"worker_process_setup_hook": HOOK, **(runtime_env or {})})
        # The node's processes (GCS, raylet, agents) are this process's children; workers are theirs.
        _node_processes[:] = [child for child in psutil.Process().children() if child.pid not in before]
        atexit.register(stop_ray)  # after ray.init's own atexit shutdown, so this one runs first
        return True
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    return False


_node_processes: list = []  # psutil.Process of the embedded cluster this process started, if any
GRACE_S = 15.0  # for the embedded cluster's processes to exit by themselves once Ray is shut down


def stop_ray(grace_s: float = GRACE_S) -> None:
    """ray.shutdown(), if Ray runs in this process; then every process of the embedded cluster this
    process started (its node processes and all their descendants, workers included) gets grace_s to
    exit, and those still running are killed. A cluster connected to is left as it is."""
    import psutil

    ray = sys.modules.get("ray")
    tree = []
    for process in _node_processes:
        try:
            tree += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    _node_processes.clear()
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for process in alive:
        try:
            name = " ".join(process.cmdline()).strip()[:80] or process.name()
            process.kill()
        except psutil.NoSuchProcess:
            continue
        print(f"ray: killed {name} (pid {process.pid}), still running {grace_s:.0f} s after the embedded "
              f"cluster shut down", file=sys.stderr)


_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}
_replaced: dict[str, str | None] = {}  # what those variables held before an embedded cluster set them


def _loopback_only(on: bool) -> None:
    """Make an embedded cluster reachable from this machine alone: its node address 127.0.0.1, so every
    Ray server (GCS, raylet, each worker's gRPC server, the agents) listens on the loopback, and gloo
    binds there too. Ray turns `_node_ip_address="127.0.0.1"` into the machine's network address; its own
    switch for a loopback node is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by the processes it starts
    and, here, by the already imported ray. A later connection to a real cluster gets back what was."""
    from ray._private import ray_constants

    if on:
        for name, value in _LOOPBACK.items():
            _replaced.setdefault(name, os.environ.get(name))
            os.environ[name] = value
    else:
        for name, value in _replaced.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _replaced.clear()
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR,
                                                              not ray_constants.IS_WINDOWS_OR_OSX)
