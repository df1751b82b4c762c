"""The merge report, merge_report.json in the output: how a blend was made.

Method, parameters, inputs, weights and losses, and the calm-dist version, so a blend can be traced
back to how it was made; an account of every input tensor (merged, copied, not used, dropped: each
dropped one with the rule that dropped it) and, with a `tokenizer:` setting, the vocabulary; for
passthrough, its slices, the input tensor each output tensor is copied from, and the input tensors no
slice uses, each with its reason. It holds no timings, so a resumed merge writes the same bytes as an
uninterrupted one.

`calm merge --verify` lists the dropped tensors from it, and checks them against the inputs' headers
where the inputs are still there (unaccounted)."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from merge.io.checkpoint_folder import Checkpoint, checkpoint_tensors
from merge.io.safetensors_file import read_header
from merge.merge_config import MergeConfig
from merge.merge_errors import MergeError
from merge.planning.inputs import Dropped, InputLayout
from merge.planning.plan import ShardTask, integer_source, shown_weights
from merge.planning.slices import SlicePlan
from merge.planning.vocab import VocabPlan

REPORT = "merge_report.json"
FORMAT = "calm-merge-report/2"


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


def tensor_account(cfg: MergeConfig, checkpoints: list[Checkpoint], layout: InputLayout) -> dict[str, dict[str, int]]:
    """Per model, how many of its stored tensors were merged, copied (integer tensors, from one model),
    not used (the other models' integer tensors) and dropped by a rule; they add up to all of them."""
    copied_from = checkpoints[integer_source(cfg)].name
    account = {}
    for ckpt in checkpoints:
        counts = dict.fromkeys(("merged", "copied", "not_used", "dropped"), 0)
        for group in layout.groups:
            if group.name in ckpt.tensors:
                kind = "merged" if group.is_float else ("copied" if ckpt.name == copied_from else "not_used")
                counts[kind] += 1
        counts["dropped"] = sum(ckpt.name in d.models for d in layout.dropped)
        account[ckpt.name] = counts
    return account


def build_report(
    cfg: MergeConfig, checkpoints: list[Checkpoint], weights: list[float], losses: list[float | None] | None,
    tasks: list[ShardTask], layout: InputLayout | SlicePlan, vocab: VocabPlan | None = None,
) -> bytes:
    examples = cfg.weights_from_examples
    report = {
        "format": FORMAT,
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
        "tokenizer": vocab.report(cfg) if vocab is not None else None,
        "drop": cfg.drop,
        "tensors": layout.account if isinstance(layout, SlicePlan) else tensor_account(cfg, checkpoints, layout),
        "dropped": _listed(layout.dropped),
        "seed": cfg.seed,
        "output": {
            "dtype": cfg.output.dtype or "inputs'",
            "shards": [t.filename for t in tasks],
            "tensors": sum(len(t.tensors) for t in tasks),
            "bytes": sum(t.nbytes for t in tasks),
        },
    }
    if isinstance(layout, SlicePlan):  # which input tensor each output tensor is, and those no slice uses
        report |= {"slices": [s.model_dump(mode="json") for s in cfg.slices or []],
                   "not_used": _listed(layout.not_used),
                   "copied_from": {out: list(source) for out, source in layout.copied_from.items()}}
    return (json.dumps(report, indent=1) + "\n").encode()


def _listed(tensors: tuple[Dropped, ...]) -> list[dict]:
    return [{"tensor": d.tensor, "models": list(d.models), "rule": d.rule} for d in tensors]


def format_weights(cfg: MergeConfig, weights: list[float], losses: list[float | None] | None) -> str:
    lines = [f"{'model':<24} {'weight':>10}" + (f" {'loss':>10}" if losses else "")]
    for name, row in weight_table(cfg, weights, losses).items():
        loss = f" {row['loss']:>10.4f}" if "loss" in row else ""
        lines.append(f"{name:<24} {row['weight']:>10.6f}{loss}")
    return "\n".join(lines)


def _load(out: Path) -> dict | None:
    try:
        return json.loads((out / REPORT).read_text())
    except (OSError, ValueError):
        return None  # verify reports a missing or altered report by its hash


def dropped_lines(out: Path) -> list[str]:
    """The input tensors a finished merge left out, each with its rule, for people."""
    report = _load(out) or {}
    return [f"dropped '{d['tensor']}' of {', '.join(d['models'])}: {d['rule']}" for d in report.get("dropped", [])]


def unaccounted(out: Path, shards: list[str]) -> list[str]:
    """Input tensors not in the output and not dropped by a recorded rule, from the inputs' headers
    (inputs no longer on disk are skipped)."""
    report = _load(out)
    if report is None:
        return []
    written = {info.name for name in shards if (out / name).exists() for info in read_header(out / name)}
    recorded = {(d["tensor"], model) for d in report.get("dropped", []) + report.get("not_used", [])
                for model in d["models"]}
    # passthrough renames the layers it copies: an input tensor is in its output when an output tensor is
    # copied from it, whatever the names.
    copied = report.get("copied_from")
    if copied is not None:
        recorded |= {(tensor, model) for out_name, (model, tensor) in copied.items() if out_name in written}
        written = set()
    problems = []
    for entry in report.get("inputs", []):
        try:
            tensors = checkpoint_tensors(Path(entry["path"]))
        except MergeError:
            tensors = None
        missing = sorted(n for n in tensors or {} if n not in written and (n, entry["name"]) not in recorded)
        problems += [f"input '{entry['name']}' tensor '{n}': not in the output, and no rule of the merge drops it"
                     for n in missing]
    return problems
