"""The merge job from config to finished folder.

Order matters: every check (config, headers, tensor names and shapes, dtypes, vocabularies, output
folder, examples) runs before the first byte is written; then the manifest, shards (skipping those a
crashed run completed), report, the manifest marked complete, and the index last.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from merge.io.checkpoint_folder import INDEX_FILE, Checkpoint
from merge.io.manifest import MANIFEST, Manifest, fingerprint, index_bytes, pending_shards, write_atomic
from merge.io.output_folder import auxiliary_files, check_output_folder, writing
from merge.io.reader import read_ahead
from merge.io.report import REPORT, build_report, format_weights
from merge.merge_config import MergeConfig
from merge.merge_errors import ExamplesError, IncompatibleInputsError, OutputError
from merge.planning.inputs import InputLayout, match_tensors
from merge.planning.plan import build_tasks, default_weights, plan_tensors

if TYPE_CHECKING:
    from merge.execution.shard import ShardResult


def run_merge(
    cfg: MergeConfig, *, address: str | None = None, show_progress: bool = True, log: Callable[[str], None] = print
) -> Path:
    """Merge as the config says; `address` runs the shards as Ray tasks there. Returns the output folder."""
    out = cfg.output.path
    checkpoints = [Checkpoint.open(m.name or "", m.path) for m in cfg.models]
    resuming = check_output_folder(out, checkpoints)
    layout = match_tensors(checkpoints, cfg.vocab_policy)
    source = checkpoints[cfg.index(cfg.output.copy_files_from) if cfg.output.copy_files_from else (cfg.base_index or 0)]
    if layout.vocab_size is not None and source.vocab_size != layout.vocab_size:
        raise IncompatibleInputsError(
            f"output.copy_files_from: vocab_policy truncate keeps {layout.vocab_size} tokens, so config and "
            f"tokenizer must come from a model with that vocabulary; '{source.name}' has {source.vocab_size}"
        )
    examples = [cfg.weights_from_examples.examples] if cfg.weights_from_examples else []
    if examples and not examples[0].is_file():
        raise ExamplesError(f"weights_from_examples.examples: {examples[0]} does not exist")
    # Where the output goes and how the work is run do not change its bytes: not part of its identity.
    settings = cfg.model_dump(mode="json", exclude={"workers": True, "memory_budget": True, "output": {"path"},
                                                    "weights_from_examples": {"workers"}})
    merge_id = fingerprint(settings, checkpoints, examples)
    manifest = Manifest.load(out) if resuming else None
    if resuming:
        if manifest is None:
            raise OutputError(f"{out}: is not empty and holds no {MANIFEST}; merge into an empty or new folder")
        if manifest.fingerprint != merge_id:
            raise OutputError(
                f"{out}: holds a different merge (its config or inputs have changed); use an empty folder"
            )
        weights, losses = manifest.weights, manifest.losses
    elif cfg.weights_from_examples:
        from merge.cocktail.weights import cocktail_weights

        weights, losses = cocktail_weights(cfg, checkpoints, log, address)
    else:
        weights, losses = default_weights(cfg), None
    tasks = build_tasks(cfg, plan_tensors(cfg, layout, weights))
    aux = auxiliary_files(source, _config_changes(cfg, layout, source))
    if weights:
        log(format_weights(cfg, weights, losses))

    # Everything is validated: from here on, files are written. The manifest comes first, so a crash at
    # any later point leaves a folder the rerun recognises (before it, the folder holds nothing of ours
    # but temporary files, and the rerun starts afresh).
    manifest = manifest or Manifest(merge_id, weights, losses, [t.filename for t in tasks])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot be created: {err.strerror or err}") from err
    with writing(out):
        manifest.save(out)
        for name, data in aux.items():
            write_atomic(out / name, data)
            manifest.files[name] = hashlib.sha256(data).hexdigest()
        todo = set(pending_shards(out, manifest))
        manifest.save(out)
    if len(todo) < len(tasks):
        log(f"resuming {out}: {len(tasks) - len(todo)} of {len(tasks)} shards already complete and verified")

    def on_done(result: ShardResult) -> None:
        manifest.done[result.filename] = {"sha256": result.sha256, "bytes": result.nbytes}
        manifest.save(out)

    run = [t for t in tasks if t.filename in todo]
    done_bytes = sum(t.data_bytes for t in tasks if t.filename not in todo)
    # Shards run in this process: their reads start now, while torch loads (merge.execution.local imports it).
    files = read_ahead(run) if run and not address and (cfg.workers == 1 or len(run) == 1) else None
    try:
        with tqdm(
            total=sum(t.data_bytes for t in tasks), initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
            desc="merge", disable=not show_progress,
        ) as bar:
            if address:
                from merge.execution.ray_runner import run_on_ray

                run_on_ray(run, address, int(cfg.memory_budget) // cfg.workers, on_done, bar.update)
            else:
                from merge.execution.local import run_local

                run_local(run, cfg.workers, on_done, bar.update, files)
    finally:
        if files is not None:
            files.close()

    report = build_report(cfg, checkpoints, weights, losses, tasks)
    with writing(out):
        write_atomic(out / REPORT, report)
        manifest.files[REPORT] = hashlib.sha256(report).hexdigest()
        manifest.complete = True
        manifest.save(out)
        if len(tasks) > 1:
            write_atomic(out / INDEX_FILE, index_bytes(out, manifest.shards))
    log(f"merged {len(checkpoints)} models into {out} ({len(tasks)} shard(s), {sum(t.nbytes for t in tasks)} bytes)")
    return out


def _config_changes(cfg: MergeConfig, layout: InputLayout, source: Checkpoint) -> dict[str, object]:
    """What the copied config.json must say differently about the merged weights."""
    changes: dict[str, object] = {}
    if cfg.output.dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in (source.config or {})] or ["dtype"]
        changes.update(dict.fromkeys(keys, cfg.output.dtype))
    if not layout.ties_embeddings and source.ties_embeddings:
        changes["tie_word_embeddings"] = False  # the output stores its own output embedding
    return changes
