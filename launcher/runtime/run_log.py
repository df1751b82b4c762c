"""Rank 0's record of a run: metrics.jsonl, TensorBoard events, and the driver's progress board."""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, start_step: int, board=None):
        from torch.utils.tensorboard import SummaryWriter

        self.metrics_file = run_dir / "metrics.jsonl"
        self.board = board
        # After a resume, forget what was logged past the checkpoint (TensorBoard: purge_step).
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if self.metrics_file.exists():
            kept = [line for line in self.metrics_file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.metrics_file.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        with open(self.metrics_file, "a") as file:
            file.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()
        if self.board is not None:
            self.board.update.remote(step, metrics)

    def step_done(self, step: int) -> None:
        """Moves the driver's progress bar every step, not only at logged ones (fire and forget)."""
        if self.board is not None:
            self.board.advance.remote(step)

    def close(self) -> None:
        self.writer.close()
