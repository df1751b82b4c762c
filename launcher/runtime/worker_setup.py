"""The first thing every Ray Train worker of ours does, for training (launcher/train/worker.py) and
evaluation (launcher/eval/worker.py) alike: its output to the run's log, DeepSpeed's accelerator, its
device. (The models it loads: calm_dist.distributed.base_models.)"""

from __future__ import annotations

import os

import torch

from launcher.runtime.quiet import redirect_worker_output


def start_worker(use_gpu: bool) -> torch.device:
    """First thing in a worker: its output to the run's log (when quiet), DeepSpeed's accelerator, the
    device."""
    redirect_worker_output()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
