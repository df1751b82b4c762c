"""`calm train CONFIG`: validate, connect to Ray (embedded local cluster by default), run the Ray Train
job of DeepSpeed ZeRO-3 workers, show progress, print a summary."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import yaml

from launcher.config import ConfigError, TrainConfig, blamed_on_command_line, load_config

USER_ERRORS = (ConfigError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.steps=50 (value parsed as YAML)",
    )


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def latest_checkpoint(run_storage: Path) -> Path | None:
    """The newest complete Ray Train checkpoint folder of a run, if any."""
    candidates = [p for p in run_storage.glob("checkpoint_*") if (p / "training_state.json").exists()]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    config = load_config(args.config, overrides)
    from launcher.preflight import describe, preflight

    with blamed_on_command_line(overrides):
        report = preflight(config)
    print(describe(report))
    return train(config, resume=args.resume)


def train(config: TrainConfig, resume: bool = False) -> int:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.progress import ProgressBoard, follow
    from launcher.train_worker import train_worker

    storage = Path(config.ray.storage_path).resolve()
    resume_from = None
    if resume:
        found = latest_checkpoint(storage / config.name)
        if found is None:
            raise ConfigError(f"--resume: no checkpoint of run {config.name!r} under {storage}")
        resume_from = str(found)
    elif (storage / config.name).exists():
        raise ConfigError(
            f"name: run {config.name!r} already exists under {storage}; pass --resume to continue it "
            "or choose another name"
        )

    workers = config.ray.num_workers
    if config.placement.mode == "pipelined":
        workers += config.placement.augmenting_workers
    if config.ray.address:
        ray.init(address=config.ray.address, runtime_env=config.ray.runtime_env or None)
    else:  # embedded local cluster, reachable only from this machine
        ray.init(num_cpus=max(2, int(workers * config.ray.cpus_per_worker) + 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1", runtime_env=config.ray.runtime_env or None,
                 log_to_driver=True)
    board_name = f"calm-progress-{config.name}-{time.time_ns()}"
    board = ProgressBoard.options(name=board_name, num_cpus=0).remote()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "board": board_name, "resume_from": resume_from},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=config.ray.use_gpu,
            resources_per_worker={"CPU": config.ray.cpus_per_worker, **config.ray.resources_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as err:  # reported below, after the progress display closes
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    last = follow(board, config.training.steps, thread)
    thread.join()
    if "error" in outcome:
        print(f"calm train: training failed: {outcome['error']}")
        return 1
    composition = Path(config.output_dir) / config.name / "composition"
    print("summary:", {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()})
    print(f"composition checkpoint: {composition}")
    print(f"tensorboard: tensorboard --logdir {Path(config.output_dir) / config.name / 'tensorboard'}")
    return 0
