"""Starting Ray, in one place: an embedded local cluster of this process's own, or a connection to one.

Every command that runs on Ray (train, eval, merge) starts it here, so they agree on what an address
means: None or 'local' is a cluster of our own, reachable only from this machine and never one that
`ray start` left running here; anything else ('auto', 'ray://head:10001', 'host:6379') is connected to.
Ray is imported only when called: `calm --help` and a merge without Ray never load it.
"""

from __future__ import annotations


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
    if address is None or address == "local":
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=log_to_driver)
        return True
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    return False
