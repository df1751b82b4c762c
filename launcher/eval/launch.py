"""One launch of `calm eval`'s workers: Ray Train starts them (the anchor partitioned under ZeRO-3), a
progress board shows how far they are, and what rank 0 posts comes back. Shared by data evaluation
(launcher.eval.command) and harness tasks (launcher.eval.harness)."""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.eval.job import EvalJob


@dataclass
class Plan:
    """A resolved evaluation: the workers' job, the Ray settings and where results go."""

    job: EvalJob
    workers: int
    cpus_per_worker: float
    address: str | None
    runtime_env: dict
    output_dir: Path
    label: str  # composition | anchor | augmenting-K



class EvalFailed(RuntimeError):
    """The workers failed; the message is the workers' error."""



def launch(p: Plan, worker: Callable[[dict], None], progress_total: Callable[[], int] | None) -> Any:
    """Run `worker` on the plan's Ray Train workers; what rank 0 put on the board comes back.
    progress_total: the number of progress steps (asked once the workers are starting), or None for
    no progress bar."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from launcher.runtime.process_group import torch_config
    from launcher.runtime.progress import ProgressBoard, follow
    from launcher.runtime.quiet import is_quiet
    from launcher.runtime.ray_start import start_ray, stop_ray

    # Ray this call starts or connects to is shut down (or disconnected) at the end; Ray already running
    # in this process is left as it was.
    own_ray = not ray.is_initialized()
    # No address: a cluster of its own, never one that `ray start` left on this machine.
    cpus = None if p.address else max(2, math.ceil(p.workers * p.cpus_per_worker) + 1)
    start_ray(p.address or None, num_cpus=cpus, runtime_env=p.runtime_env or None, log_to_driver=not is_quiet())
    job = p.job
    board_name = f"calm-eval-progress-{time.time_ns()}"
    board = ProgressBoard.options(name=board_name, num_cpus=0).remote()
    storage = (p.output_dir / ".ray").resolve()  # Ray Train's bookkeeping; removed after a success
    run_name = f"eval-{p.label}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        worker,
        train_loop_config={"job": job.model_dump(mode="json"), "board": board_name},
        scaling_config=ScalingConfig(num_workers=p.workers, use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": p.cpus_per_worker}),
        torch_config=torch_config(job.use_gpu),
        run_config=RunConfig(name=run_name, storage_path=str(storage)),
    )
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as err:  # re-raised below, after the progress display closes
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    if progress_total is not None:
        follow(board, progress_total(), thread, desc=f"eval {p.label}", unit="batch")
    thread.join()
    result = ray.get(board.get_result.remote()) if "error" not in outcome else None
    ray.kill(board)
    if own_ray:
        stop_ray()
    if "error" in outcome:
        from launcher.runtime.worker_errors import input_error_in

        # Bad input a worker met (a corrupt composition file, data it cannot use) is the user's to fix:
        # one line, as on the driver.
        raise input_error_in(outcome["error"]) or EvalFailed(outcome["error"])
    shutil.rmtree(storage / run_name, ignore_errors=True)
    with contextlib.suppress(OSError):
        storage.rmdir()  # only if no other evaluation is using it
    return result
