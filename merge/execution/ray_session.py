"""Ray around one step of a merge (partitioned losses, shard tasks), started through the caller.

Started for the step through the caller's start_ray, and shut down after it if that started a cluster.

The merge never calls ray.init itself: launcher/runtime/ray_start.py is the one place Ray is started,
and `calm merge` hands its start_ray down through merge.job.run_merge. Without one, Ray must already
run in this process (started by a test, a notebook, another library).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

# launcher.runtime.ray_start.start_ray: (address, *, num_cpus=None, ...) -> whether it started a cluster
# this process owns (address None or 'local': an embedded one; num_cpus counts only there).
StartRay = Callable[..., bool]


@contextlib.contextmanager
def ray_session(start_ray: StartRay | None, address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Ray running for the block: at `address`, else an embedded cluster of `num_cpus` CPUs."""
    import ray

    if start_ray is not None:
        started = start_ray(address, num_cpus=num_cpus)
    elif ray.is_initialized():
        started = False
    else:
        raise RuntimeError("this merge step runs on Ray, which is not running: pass start_ray "
                           "(launcher.runtime.ray_start.start_ray) to run_merge, or start Ray first")
    try:
        yield
    finally:
        if started:
            from launcher.runtime.ray_start import stop_ray

            stop_ray()
