"""What each Ray Train worker of `calm train` runs: its role (an anchor rank training with the Trainer,
or, in a pipelined run, an augmenting rank serving hidden states), the checkpoint to resume from, and
the run's log and checkpoints handed to Ray Train."""

from __future__ import annotations

from pathlib import Path

from launcher.runtime.run_log import RunLog
from launcher.runtime.worker_setup import start_worker
from launcher.train_config import TrainConfig


def train_worker(loop_config: dict) -> None:
    config = TrainConfig.model_validate(loop_config["config"])
    device = start_worker(config.ray.use_gpu)
    import ray.train

    from calm_dist.distributed.placement import Layout, split_world
    from calm_dist.distributed.trainer import Trainer, serve_augmenting

    rank = ray.train.get_context().get_world_rank()
    layout = world = None
    if config.placement.mode == "pipelined":
        layout = Layout(config.ray.num_workers, config.placement.augmenting_workers)
        world = split_world(layout, "nccl" if config.ray.use_gpu else "gloo")  # anchors get a world of their own
        if not layout.is_anchor(rank):
            # Ray Train needs every worker to report as often as the others: once per checkpoint.
            serve_augmenting(config, layout, world.exchange, device, on_barrier=lambda: ray.train.report({}))
            world.close()
            return

    trainer = Trainer(config, device, rank, layout=layout, exchange=world.exchange if world else None)
    # The driver names the newest complete checkpoint on disk; Ray Train may know one too (restored from
    # its snapshot, or kept across a restart it made itself). The higher step wins: Ray's snapshot can lag.
    resume_from = loop_config.get("resume_from")
    checkpoint = _newest(ray.train.get_checkpoint(), ray.train.Checkpoint(resume_from) if resume_from else None)
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.resume(directory, name=checkpoint.path)

    run_dir = Path(config.output_dir) / config.name
    board = ray.get_actor(loop_config["board"]) if loop_config.get("board") else None
    run_log = RunLog(run_dir, trainer.step, board) if rank == 0 else None

    def report(step: int, directory: str) -> None:
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(directory))

    trainer.fit(report, on_log=run_log.log if run_log is not None else lambda step, metrics: None)
    trainer.export(run_dir / "composition")
    if run_log is not None:
        run_log.close()
    if world is not None:
        world.close()  # Ray Train destroys the default group itself, never this one


def _newest(*checkpoints):
    """The checkpoint saved at the highest step among those given (None entries skipped)."""
    from calm_dist.distributed.checkpoint_layout import checkpoint_step

    def step(checkpoint) -> int:
        with checkpoint.as_directory() as directory:
            return checkpoint_step(directory)

    return max((c for c in checkpoints if c is not None), key=step, default=None)
