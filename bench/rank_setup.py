"""What a bench process that torchrun starts does first (bench/plan_worker.py, bench/scaling_worker.py):
one thread, the gloo group, the placement's groups, and their teardown before the interpreter's."""

import atexit

import torch
import torch.distributed as dist

from calm_dist.distributed.placement import Layout, SplitWorld, join_placement


def start_rank(config) -> tuple[int, Layout | None, SplitWorld | None]:
    """(rank, layout, split world) for a launcher.train_config.TrainConfig; layout and world are None
    for a colocated run."""
    torch.set_num_threads(1)  # one core per process: an augmenting rank gets a core of its own
    dist.init_process_group("gloo")
    rank = dist.get_rank()  # before the split: an augmenting rank has no default group after it
    layout, world = join_placement(config, "gloo")

    @atexit.register
    def _shut_down_groups() -> None:
        # Before interpreter teardown: gloo groups left to it can abort the process at exit.
        if world is not None:
            world.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    return rank, layout, world
