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

    from calm_dist.distributed.placement import join_placement
    from calm_dist.distributed.trainer import Trainer, serve_augmenting

    rank = ray.train.get_context().get_world_rank()
    layout, world = join_placement(config, "nccl" if config.ray.use_gpu else "gloo")
    if layout is not None and not layout.is_anchor(rank):
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
        with checkpoint.as_directory() as directory:  # a download first when the storage is a URI
            trainer.resume(directory, name=_where(checkpoint))

    run_dir = Path(config.output_dir) / config.name
    board = ray.get_actor(loop_config["board"]) if loop_config.get("board") else None
    run_log = RunLog(run_dir, trainer.step, board) if rank == 0 else None

    def report(step: int, directory: str) -> None:
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(directory))

    if run_log is not None:
        trainer.fit(report, on_log=run_log.log, on_step=run_log.step_done)
    else:
        trainer.fit(report, on_log=lambda step, metrics: None)
    trainer.export(run_dir / "composition")
    if run_log is not None:
        run_log.close()
    if world is not None:
        world.close()  # Ray Train destroys the default group itself, never this one


def _newest(*checkpoints):
    """The checkpoint saved at the highest step among those given (None entries skipped), read where they
    lie (no download)."""
    from calm_dist.distributed.checkpoint_layout import checkpoint_step

    def step(checkpoint) -> int:
        return checkpoint_step(checkpoint.path, checkpoint.filesystem)

    return max((c for c in checkpoints if c is not None), key=step, default=None)


def _where(checkpoint) -> str:
    """A checkpoint's folder for messages: its local path, or scheme://bucket/path."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"
