"""`calm train CONFIG`: train a composition with Ray Train workers running DeepSpeed ZeRO-3.

Validate the config, connect to Ray (an embedded local cluster by default), run the Ray Train job of
DeepSpeed ZeRO-3 workers, show progress, print a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from calm_dist.errors import InputError
from launcher.train_config import (
    TrainConfig,
    blamed_on_command_line,
    load_config,
    parse_overrides,
)

USER_ERRORS = (InputError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.steps=50 (value parsed as YAML)",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray, DeepSpeed and library output here instead of in the run's log file")


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    config = load_config(args.config, overrides)
    from launcher.preflight import describe, preflight
    from launcher.runtime.quiet import log_path, quiet_output

    with quiet_output(log_path(config.run_dir, "train"), verbose=args.verbose):
        with blamed_on_command_line(overrides):
            report = preflight(config)
        print(describe(report))
        return train(config, resume=args.resume)


def train(config: TrainConfig, resume: bool = False) -> int:

    from launcher.runtime import run_folder
    from launcher.runtime.progress import ProgressBoard, follow, summary
    from launcher.runtime.quiet import is_quiet, one_line
    from launcher.runtime.ray_start import start_ray, stop_ray
    from launcher.runtime.worker_errors import first_line, input_error_in

    # A local folder, or a URI (s3://...) that Ray Train and the checks here reach through one filesystem.
    run_storage = run_folder.open_run_storage(config.ray.storage_path, config.name)
    continues_from = run_folder.starting_point(run_storage, config.name, resume)  # deletes nothing of the user's
    if resume and continues_from is None:
        print(f"--resume: run {config.name!r} has no checkpoint yet under {run_storage.show()}; starting from step 0")
    if continues_from is not None:  # the sharding a resume needs, checked before any worker loads a model
        _check_resumable(config, run_storage, continues_from)

    workers = config.ray.num_workers
    if config.placement.mode == "pipelined":
        workers += config.placement.augmenting_workers
    # Inside a Ray job (`calm submit`, `ray job submit`) the job already runs in its runtime env, which
    # `calm submit` built from ray.runtime_env; giving it again makes Ray refuse to merge the two.
    address = config.ray.address or None
    in_job = address is not None and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    # No address: an embedded cluster of its own, reachable only from this machine, sized to the workers.
    cpus = None if address else max(2, int(workers * config.ray.cpus_per_worker) + 1)
    start_ray(address, num_cpus=cpus, runtime_env=None if in_job else config.ray.runtime_env or None,
              log_to_driver=not is_quiet())

    # Retries are decided here rather than by Ray Train's FailureConfig, which retries every worker error:
    # an input error fails the same way each time, so it ends the run at once, in one line.
    for attempt in range(config.ray.max_failures + 1):
        resume_from = run_folder.newest_checkpoint(run_storage)
        # A board per attempt: each shows its own steps, the steps redone after a restart included.
        board_name = f"calm-progress-{config.name}-{time.time_ns()}"
        board = ProgressBoard.options(name=board_name, num_cpus=0).remote()
        outcome = _attempt(config, workers, run_storage.ray_storage_path, board, board_name,
                           resume_from.source if resume_from else None, follow)
        if "error" not in outcome:
            break
        error = outcome["error"]
        if (input_error := input_error_in(error)) is not None:
            stop_ray()  # before the one line: the cluster's own farewells come first, not after it
            raise input_error
        if attempt == config.ray.max_failures:
            stop_ray()
            print(f"calm train: training failed: {one_line(error)}")
            print(error, file=sys.stderr)  # the whole story, for the log
            return 1
        print(f"calm train: attempt {attempt + 1} failed ({first_line(error)}); restarting from the newest "
              f"checkpoint ({attempt + 1} of ray.max_failures={config.ray.max_failures} retries)")
    # Ray Train keeps checkpoint_config.num_to_keep of the checkpoints it registered; uploads it never
    # registered (cut short by a failure, or superseded) are left to us.
    run_folder.remove_unregistered(run_storage)
    run_dir = Path(config.output_dir) / config.name
    print(summary(outcome["last"]))
    print(f"composition: {run_dir / 'composition'}")
    print(f"metrics:     {run_dir / 'metrics.jsonl'}")
    print(f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0


def _check_resumable(config: TrainConfig, run_storage, checkpoint) -> None:
    """DataError naming the checkpoint's file if its data position cannot continue under this config's
    seed and batch sizes (the record count, known only after tokenizing, is left to the workers)."""
    from calm_dist.data.batches import check_data_position
    from calm_dist.data.records import DataError
    from calm_dist.distributed.checkpoint_layout import STATE
    from launcher.runtime.run_folder import saved_data_position

    run = {"seed": config.training.seed, "world_size": config.ray.num_workers,
           "micro_batch_size": config.training.micro_batch_size}
    try:
        check_data_position(saved_data_position(run_storage, checkpoint), run)
    except DataError as err:
        raise DataError(f"{checkpoint.path}/{STATE}: {err}") from None


def _attempt(config: TrainConfig, workers: int, storage: str, board, board_name: str, resume_from: str | None,
             follow) -> dict:
    """One Ray Train run of the worker group, with its progress shown: {"last": metrics} or {"error": ...}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from launcher.runtime.process_group import torch_config
    from launcher.train.worker import train_worker

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "board": board_name,
                           "resume_from": str(resume_from) if resume_from else None},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=config.ray.use_gpu,
            resources_per_worker={"CPU": config.ray.cpus_per_worker, **config.ray.resources_per_worker},
        ),
        torch_config=torch_config(config.ray.use_gpu),
        run_config=RunConfig(
            name=config.name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=0),
            # By step, so a checkpoint resumed from (registered before the restart) ranks as it should.
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="step",
                                               checkpoint_score_order="max"),
        ),
    )
    outcome: dict = {}

    def fit():
        try:
            trainer.fit()
        except Exception as err:  # reported by the caller, after the progress display closes
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    outcome["last"] = follow(board, config.training.steps, thread)
    thread.join()
    return outcome
