"""The merge job from config to finished folder, and the weights-from-examples step it runs first.

Order matters: every check (config, headers, tensor names and shapes, dtypes, vocabularies, output
folder, examples) runs before the first byte is written; then the manifest, shards (skipping those a
crashed run completed), report, the manifest marked complete, and the index last.

This module sits above merge.cocktail (the LM-Cocktail recipe) and merge.execution (processes, Ray):
cocktail_weights() picks where the losses are computed. Ray, where a step needs it, is started through
the caller's start_ray (merge.execution.ray_session).
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
from merge.planning.slices import SlicePlan, plan_slices
from merge.planning.vocab import (
    TOKENIZER_FILES,
    VocabPlan,
    check_same_vocabulary,
    check_union_groups,
    plan_vocabulary,
    tokenizer_files,
)

if TYPE_CHECKING:
    from merge.execution.ray_session import StartRay
    from merge.execution.shard import ShardResult


def run_merge(
    cfg: MergeConfig, *, address: str | None = None, show_progress: bool = True, log: Callable[[str], None] = print,
    start_ray: StartRay | None = None,
) -> Path:
    """Merge as the config says; `address` runs the shards as Ray tasks there ('local': an embedded
    cluster). Returns the output folder. Ray, where needed (an address, weights_from_examples.workers > 1),
    is started with `start_ray` (launcher.runtime.ray_start.start_ray) and shut down after the step if
    that started it; without start_ray, Ray must already run in this process."""
    out = cfg.output.path
    checkpoints = [Checkpoint.open(m.name or "", m.path) for m in cfg.models]
    resuming = check_output_folder(out, checkpoints)
    vocab = plan_vocabulary(cfg, checkpoints) if cfg.tokenizer else None
    if vocab is not None and cfg.tokenizer and cfg.tokenizer.source == "union":
        check_union_groups(cfg, vocab)
    # passthrough copies layer slices (merge.planning.slices); the other methods merge tensors matched by name.
    layout: InputLayout | SlicePlan
    if cfg.slices is not None:
        layout = plan_slices(cfg, checkpoints)
        source = checkpoints[layout.files_from]
    else:
        layout = match_tensors(checkpoints, cfg.vocab_policy, cfg.drop, vocab.rows if vocab else None)
        if vocab is None:
            check_same_vocabulary(checkpoints, layout.vocab_size)
        if vocab is not None:
            source = checkpoints[vocab.files_from]
        else:
            source = checkpoints[cfg.index(cfg.output.copy_files_from) if cfg.output.copy_files_from
                                 else (cfg.base_index or 0)]
    if isinstance(layout, InputLayout) and layout.vocab_size is not None and source.vocab_size != layout.vocab_size:
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
    # Tokenizers decide a remapped vocabulary's rows: part of the inputs then.
    tokenizers = [c.path / n for c in checkpoints for n in TOKENIZER_FILES if vocab and (c.path / n).is_file()]
    merge_id = fingerprint(settings, checkpoints, examples + tokenizers)
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
        weights, losses = cocktail_weights(cfg, checkpoints, log, address, start_ray)
    else:
        weights, losses = default_weights(cfg), None
    if isinstance(layout, SlicePlan):
        tasks = build_tasks(cfg, list(layout.tensors))
        changes = _config_changes(cfg, layout.ties_embeddings, source, None) | layout.config_changes
    else:
        tasks = build_tasks(cfg, plan_tensors(cfg, layout, weights))
        changes = _config_changes(cfg, layout.ties_embeddings, source, vocab)
    aux = auxiliary_files(source, changes)
    if vocab is not None and vocab.added:  # a union: the base's tokenizer files give way to the union's
        aux = {k: v for k, v in aux.items() if k not in TOKENIZER_FILES} | tokenizer_files(vocab, checkpoints)
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
                from merge.execution.ray_session import ray_session

                with ray_session(start_ray, address):
                    run_on_ray(run, int(cfg.memory_budget) // cfg.workers, on_done, bar.update)
            else:
                from merge.execution.local import run_local

                run_local(run, cfg.workers, on_done, bar.update, files)
    finally:
        if files is not None:
            files.close()

    report = build_report(cfg, checkpoints, weights, losses, tasks, layout, vocab)
    with writing(out):
        write_atomic(out / REPORT, report)
        manifest.files[REPORT] = hashlib.sha256(report).hexdigest()
        manifest.complete = True
        manifest.save(out)
        if len(tasks) > 1:
            write_atomic(out / INDEX_FILE, index_bytes(out, manifest.shards))
    log(f"merged {len(checkpoints)} models into {out} ({len(tasks)} shard(s), {sum(t.nbytes for t in tasks)} bytes)")
    return out


def cocktail_weights(
    cfg: MergeConfig, checkpoints: list[Checkpoint], log: Callable[[str], None], address: str | None = None,
    start_ray: StartRay | None = None,
) -> tuple[list[float], list[float | None]]:
    """Weights for every model (config order) and the losses behind them (None for fixed models).
    Each candidate is scored in this process, or with weights_from_examples.workers > 1 partitioned
    over Ray workers: on the cluster at `address` if given, else on an embedded one that is shut
    down after the losses (started with `start_ray`, as in run_merge)."""
    from merge.cocktail.examples import read_examples
    from merge.cocktail.weights import tokenizer_folder, weights_from_losses

    spec = cfg.weights_from_examples
    assert spec is not None
    examples = read_examples(spec.examples, spec.kind, spec.negatives)
    tokenizer_dir = tokenizer_folder(checkpoints)
    if spec.workers > 1:  # each candidate partitioned over ZeRO-3 workers (merge/execution/partitioned_losses.py)
        from merge.execution.partitioned_losses import check_dtypes, partitioned_losses
        from merge.execution.ray_session import ray_session

        scored = [(c.name, (c.path, tokenizer_dir(c))) for c in checkpoints if c.name not in spec.fixed]
        check_dtypes([candidate for _, candidate in scored])  # before Ray starts
        with ray_session(start_ray, address, num_cpus=spec.workers):
            found = partitioned_losses([candidate for _, candidate in scored], examples, spec, log)
        by_name = dict(zip([name for name, _ in scored], found, strict=True))

        def loss_of(ckpt: Checkpoint) -> float:
            return by_name[ckpt.name]
    else:
        from merge.cocktail.losses import model_loss

        def loss_of(ckpt: Checkpoint) -> float:
            return model_loss(ckpt.path, tokenizer_dir(ckpt), examples, spec)

    return weights_from_losses(spec, checkpoints, loss_of, len(examples), log)


def _config_changes(cfg: MergeConfig, ties: bool, source: Checkpoint, vocab: VocabPlan | None) -> dict[str, object]:
    """What the copied config.json must say differently about the merged weights."""
    changes: dict[str, object] = {}
    if vocab is not None and source.vocab_size != vocab.rows.rows:
        config = source.config or {}
        if "vocab_size" in config or not isinstance(config.get("text_config"), dict):
            changes["vocab_size"] = vocab.rows.rows
        else:
            changes["text_config"] = {**config["text_config"], "vocab_size": vocab.rows.rows}
    if cfg.output.dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in (source.config or {})] or ["dtype"]
        changes.update(dict.fromkeys(keys, cfg.output.dtype))
    if not ties and source.ties_embeddings:
        changes["tie_word_embeddings"] = False  # the output stores its own output embedding
    return changes
