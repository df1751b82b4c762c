"""Progress of a run on the driver, drawn from what rank 0 posts to a tiny Ray actor.

Rank 0 posts metrics (or, in evaluation, a count of micro-batches done) to the actor; the driver polls
it and draws a progress bar on stdout (the terminal, also when quiet output sends everything else to
the log), one line per logged step.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import ray
from tqdm import tqdm


@ray.remote
class ProgressBoard:
    def __init__(self):
        self.step, self.metrics, self.history = 0, {}, []

    def update(self, step: int, metrics: dict) -> None:
        self.step, self.metrics = step, metrics
        self.history.append(metrics)

    def advance(self, step: int) -> None:
        self.step = step

    def set_result(self, result: dict) -> None:
        self.result = result

    def get_result(self) -> dict | None:
        return getattr(self, "result", None)

    def read(self, seen: int) -> tuple[int, list[dict]]:
        return self.step, self.history[seen:]


def _line(metrics: dict) -> str:
    parts = [f"step {metrics['step']}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}",
             f"{metrics['tokens_per_s']:.0f} tok/s", f"{metrics['step_time_s']:.2f} s/step"]
    if "eval_loss" in metrics:
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    if "eval_exact_match" in metrics:
        parts.append(f"exact_match {metrics['eval_exact_match']:.3f}")
    return "  ".join(parts)


def summary(metrics: dict) -> str:
    """The last logged metrics of a finished run, for people."""
    if not metrics:
        return "done: no step was logged"
    parts = [f"done: {metrics['step']} steps", f"loss {metrics['loss']:.4f}"]
    if "eval_loss" in metrics:
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    if "eval_exact_match" in metrics:
        parts.append(f"exact_match {metrics['eval_exact_match']:.3f}")
    parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)


def follow(board, total_steps: int, training: threading.Thread, interval: float = 0.5, desc: str = "training",
           unit: str = "step", line: Callable[[dict], str] = _line) -> dict:
    """Draw progress until the training thread ends; return the last metrics seen."""
    seen, last = 0, {}
    # disable=None: no bar when stdout is not a terminal (a log file gets the step lines alone).
    with tqdm(total=total_steps, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stdout, disable=None) as bar:
        while True:
            done = not training.is_alive()
            try:
                step, new = ray.get(board.read.remote(seen), timeout=10)
            except Exception:  # the cluster is going away with the run; nothing more to show
                break
            seen += len(new)
            for metrics in new:
                bar.write(line(metrics), file=sys.stdout)
                last = metrics
            bar.n = step
            bar.refresh()
            if done:
                break
            training.join(interval)
    return last
