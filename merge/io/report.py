"""The merge report, merge_report.json in the output: how a blend was made.

Method, parameters, inputs, weights and losses, and the calm-dist version, so a blend can be traced
back to how it was made. It holds no timings, so a resumed merge writes the same bytes as an
uninterrupted one."""

from __future__ import annotations

import json
from importlib import metadata

from merge.io.checkpoint_folder import Checkpoint
from merge.merge_config import MergeConfig
from merge.planning.plan import ShardTask, shown_weights

REPORT = "merge_report.json"


def version() -> str:
    try:
        return metadata.version("calm-dist")
    except metadata.PackageNotFoundError:
        return "unknown"


def weight_table(cfg: MergeConfig, weights: list[float], losses: list[float | None] | None) -> dict[str, dict[str, float]]:
    """Per model: the weight it is merged with (normalized, if the method normalizes) and its loss
    when weights came from examples, keyed by model name."""
    if not cfg.merge_method.takes_weights:
        return {}
    mixed = cfg.source_order if cfg.base_index is None else cfg.source_order[1:]
    names = [cfg.names[i] for i in mixed]
    effective = shown_weights(cfg, weights)
    rows: dict[str, dict[str, float]] = {name: {"weight": w} for name, w in zip(names, effective, strict=True)}
    for name, loss in zip(cfg.names, losses or [], strict=False):
        if loss is not None:
            rows[name]["loss"] = loss
    return rows


def build_report(
    cfg: MergeConfig, checkpoints: list[Checkpoint], weights: list[float], losses: list[float | None] | None, tasks: list[ShardTask]
) -> bytes:
    examples = cfg.weights_from_examples
    report = {
        "format": "calm-merge-report/1",
        "calm_dist_version": version(),
        "method": cfg.method,
        "parameters": cfg.params_for(None).model_dump(by_alias=True),
        "base_model": cfg.names[cfg.base_index] if cfg.base_index is not None else None,
        "inputs": [
            {"name": c.name, "path": str(c.path), "tensors": len(c.tensors), "bytes": sum(t.nbytes for t in c.tensors.values())}
            for c in checkpoints
        ],
        "weights_from": "examples" if examples else ("config" if cfg.weights is not None else "default"),
        "weights": weight_table(cfg, weights, losses),
        "examples": examples.model_dump(mode="json") if examples else None,
        "overrides": [o.model_dump(mode="json") for o in cfg.overrides],
        "vocab_policy": cfg.vocab_policy,
        "seed": cfg.seed,
        "output": {
            "dtype": cfg.output.dtype or "inputs'",
            "shards": [t.filename for t in tasks],
            "tensors": sum(len(t.tensors) for t in tasks),
            "bytes": sum(t.nbytes for t in tasks),
        },
    }
    return (json.dumps(report, indent=1) + "\n").encode()


def format_weights(cfg: MergeConfig, weights: list[float], losses: list[float | None] | None) -> str:
    lines = [f"{'model':<24} {'weight':>10}" + (f" {'loss':>10}" if losses else "")]
    for name, row in weight_table(cfg, weights, losses).items():
        loss = f" {row['loss']:>10.4f}" if "loss" in row else ""
        lines.append(f"{name:<24} {row['weight']:>10.6f}{loss}")
    return "\n".join(lines)
