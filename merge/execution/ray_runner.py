"""Running shard tasks as Ray tasks across a cluster (`calm merge --address ...`).

Inputs and the output folder must be on a filesystem every node sees at the same path (NFS, Lustre, a
mounted bucket). Each task asks Ray for its share of the memory budget as the `memory` resource, so a
node runs only as many shards at once as its memory allows. Progress is counted per finished shard.
Ray is already running here: the caller started it (merge.execution.ray_session).
"""

from __future__ import annotations

from collections.abc import Callable

import ray

from merge.execution.shard import Progress, ShardResult, run_shard
from merge.planning.plan import ShardTask


def run_on_ray(
    tasks: list[ShardTask], memory_per_task: int, on_done: Callable[[ShardResult], None], progress: Progress
) -> None:
    """Run the tasks on the Ray this process runs, each asking for `memory_per_task` bytes."""
    if not ray.is_initialized():
        raise RuntimeError("run_on_ray: Ray is not running (merge.execution.ray_session starts it)")
    remote = ray.remote(run_shard)
    refs = {
        remote.options(num_cpus=1, memory=memory_per_task, max_retries=1).remote(task): task
        for task in tasks
    }
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            task = refs.pop(ready[0])
            on_done(ray.get(ready[0]))
            progress(task.data_bytes)
    except BaseException:
        for ref in refs:
            ray.cancel(ref)
        raise
