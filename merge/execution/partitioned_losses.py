"""Cocktail losses of candidates too large for one machine, each partitioned over N Ray workers.

Each candidate is loaded partitioned with ZeRO-3 over N Ray workers (`weights_from_examples.workers:
N`), each worker holding 1/N of it.

The workers form one torch.distributed group for the whole job and score the candidates one after
another; each worker loads its slice of a candidate (calm_dist.distributed.partitioned_scoring), runs
merge.cocktail.losses.score_model, the same recipe as a single process, and frees it before the next.
Every worker computes the same loss (ZeRO-3 gathers each layer whole for its forward); rank 0's is
used and the others are checked against it.

Ray is already running here: merge.job.cocktail_weights starts it around this step
(merge.execution.ray_session). On a cluster (`calm merge --address ...`) the workers are Ray actors
placed anywhere; the candidates and examples must be on storage every node sees at the same path.
Without an address the cluster is an embedded local one, stopped after the losses.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Callable
from pathlib import Path

import ray

from merge.merge_config import ExamplesWeights
from merge.merge_errors import ExamplesError

PARTITIONED_DTYPES = ("float32", "bfloat16")


@ray.remote
class LossWorker:
    """One rank of the scoring group."""

    def address(self) -> tuple[str, int]:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.util.get_node_ip_address(), sock.getsockname()[1]

    def join(self, master_addr: str, master_port: int, rank: int, world_size: int, use_gpu: bool) -> None:
        from calm_dist.distributed.partitioned_scoring import join_group

        join_group(master_addr, master_port, rank, world_size, use_gpu)

    def score(self, path: str, tokenizer_path: str, examples: list, spec: dict) -> dict:
        from transformers import AutoTokenizer

        from calm_dist.distributed.partitioned_scoring import score_partitioned
        from merge.cocktail.losses import score_model

        settings = ExamplesWeights.model_validate(spec)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        scored = score_partitioned(path, settings.kind, lambda model: score_model(model, tokenizer, examples, settings))
        return {"loss": scored.loss, "held_bytes": scored.held_bytes, "total_bytes": scored.total_bytes}


def gpus_for(workers: int) -> bool:
    """Whether each scoring worker gets a GPU of its own: when the cluster has one for every worker (a
    70B candidate on CPUs would take hours). Ray then hides every other GPU from the worker."""
    return ray.cluster_resources().get("GPU", 0) >= workers


def check_dtypes(candidates: list[tuple[Path, Path]]) -> None:
    """ExamplesError unless every candidate is stored in a dtype the partitioned workers load."""
    for path, _ in candidates:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise ExamplesError(f"weights_from_examples.workers: {path}/config.json cannot be read: {err}") from None
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        if dtype not in PARTITIONED_DTYPES:
            raise ExamplesError(f"weights_from_examples.workers: {path} is {dtype}; partitioned workers load "
                                f"{' or '.join(PARTITIONED_DTYPES)} checkpoints (use workers: 1)")


def partitioned_losses(
    candidates: list[tuple[Path, Path]],
    examples: list,
    spec: ExamplesWeights,
    log: Callable[[str], None],
    report: list[dict] | None = None,
) -> list[float]:
    """The loss of each (model folder, tokenizer folder) candidate, in order, on the Ray this process
    runs. `report`, if given, receives per candidate the bytes each worker held and the model's total."""
    check_dtypes(candidates)
    if not ray.is_initialized():
        raise RuntimeError("partitioned_losses: Ray is not running (merge.execution.ray_session starts it)")
    use_gpu = gpus_for(spec.workers)
    workers = [LossWorker.options(num_cpus=1, num_gpus=int(use_gpu)).remote() for _ in range(spec.workers)]
    try:
        master_addr, master_port = ray.get(workers[0].address.remote())
        ray.get([w.join.remote(master_addr, master_port, rank, spec.workers, use_gpu)
                 for rank, w in enumerate(workers)])
        losses = []
        for path, tokenizer_path in candidates:
            results = ray.get([w.score.remote(str(path), str(tokenizer_path), examples, spec.model_dump(mode="json"))
                               for w in workers])
            loss = results[0]["loss"]
            if any(not math.isclose(r["loss"], loss, rel_tol=1e-6, abs_tol=1e-9) for r in results if math.isfinite(loss)):
                raise RuntimeError(f"{path}: the workers computed different losses {[r['loss'] for r in results]}")
            total = results[0]["total_bytes"]
            shares = ", ".join(f"{r['held_bytes'] / total:.3f}" for r in results)
            log(f"{path.name}: scored on {spec.workers} workers, each holding its share of the weights ({shares})")
            if report is not None:
                report.append({"path": str(path), "loss": loss, "total_bytes": total,
                               "held_bytes": [r["held_bytes"] for r in results]})
            losses.append(loss)
        return losses
    finally:
        for worker in workers:
            ray.kill(worker)
