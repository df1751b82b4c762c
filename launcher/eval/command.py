"""`calm eval CONFIG_OR_COMPOSITION --data FILE`: score a composition, or one of its base models alone.

Exact match and mean loss on prompt/completion (or plain text) data, or with --tasks lm-evaluation-harness
tasks (launcher.eval.harness).

Runs on the same kind of workers as training: Ray Train starts them, each loads the anchor straight into
its DeepSpeed ZeRO-3 partition (so a 70B anchor can be scored on the GPUs that trained it), and greedy
completions are decoded with KV caches. A training config evaluates that run's exported composition
(runs/NAME/composition); a composition folder names its base models in composition.json. The result is
a table on the terminal and JSON in the run folder's eval/ folder.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from calm_dist.errors import CompositionError, InputError
from launcher.base_model_flags import add_base_model_arguments
from launcher.eval.job import EvalJob
from launcher.eval.launch import Plan, launch
from launcher.train_config import ConfigError, ModelSpec, load_config

USER_ERRORS = (InputError,)  # the driver's checks and what a worker met alike


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a training config (YAML; evaluates runs/NAME/composition) or a composition folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", metavar="FILE",
                      help="evaluation records: JSONL, JSON, CSV or Parquet; several files are scored in one "
                      "launch, the models loaded once")
    what.add_argument("--tasks", nargs="+", metavar="TASK",
                      help="lm-evaluation-harness tasks instead: harness task names, or paths of task YAML files "
                      "(needs pip install 'calm-dist[eval]')")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--anchor-only", action="store_true", help="score the anchor alone (baseline row)")
    which.add_argument("--augmenting-only", type=int, metavar="K", help="score augmenting model K alone (baseline row)")
    parser.add_argument("--samples", type=int, help="evaluate only the first N records (default: all); with "
                        "--tasks, the first N documents of each task")
    parser.add_argument("--max-new-tokens", type=int, help="greedy decoding length (default: training.eval_max_new_tokens, "
                        "else 32; with --tasks: where a task does not say, 256)")
    parser.add_argument("--num-fewshot", type=int, help="with --tasks: few-shot examples (default: each task's)")
    parser.add_argument("--log-samples", action="store_true",
                        help="with --tasks: also write every document's requests and answers (samples_TASK_DATE.jsonl)")
    parser.add_argument("--workers", type=int, help="Ray Train workers sharing the anchor (default: ray.num_workers, else 1)")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per worker per forward (default: training's, else 8)")
    add_base_model_arguments(parser, from_config=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="base models' dtype for a composition folder (default float32; a config says its own)")
    parser.add_argument("--prompt-field", help="default: the config's data.prompt_field, else 'prompt'")
    parser.add_argument("--completion-field", help="default: the config's data.completion_field, else 'completion'")
    parser.add_argument("--text-field", help="plain text data: loss only, no exact match")
    parser.add_argument("--max-length", type=int, help="tokens per sequence (default: data.max_length, else 512; with "
                        "--tasks: the anchor's context length)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (a config says ray.use_gpu itself)")
    parser.add_argument("--address", help="Ray cluster address (default: the config's ray.address, else a local cluster)")
    parser.add_argument("--output-dir", help="where the JSON goes (default: the run folder's eval/)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray, DeepSpeed and library output here instead of in the log file")


def _spec(path: str, key: str, dtype: str, trust_remote_code: bool = False) -> ModelSpec:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {folder} is not a Hugging Face model folder (no config.json)")
    return ModelSpec(path=str(folder.resolve()), dtype=dtype, trust_remote_code=trust_remote_code)


def plan(target: str | Path, data: str | Path | list[str | Path] | None, *, tasks: list[str] | None = None,
         num_fewshot: int | None = None, log_samples: bool = False, anchor_only: bool = False, augmenting_only: int | None = None,
         samples: int | None = None, max_new_tokens: int | None = None, workers: int | None = None,
         micro_batch_size: int | None = None, anchor: str | None = None, augmenting: list[str] | None = None,
         tokenizer: str | None = None, augmenting_tokenizer: list[str] | None = None, dtype: str | None = None,
         prompt_field: str | None = None, completion_field: str | None = None, text_field: str | None = None,
         max_length: int | None = None, gpu: bool = False, address: str | None = None,
         output_dir: str | Path | None = None) -> Plan:
    """Resolve the target and flags and check them on the driver: ConfigError, DataError or
    CompositionError name the file or flag at fault, before any worker starts. tasks: lm-evaluation-harness
    tasks instead of data (launcher.eval.harness)."""
    from calm_dist.model.composition_checkpoint import (
        MANIFEST,
        WEIGHTS,
        check_weights_readable,
        read_manifest,
    )

    if (data is None) == (tasks is None):
        raise ConfigError("give --data FILE... or --tasks TASK... (one of the two)")
    # The harness's defaults are its own (the anchor's context length, its generation length), not the
    # data's: only what the flags say goes to it.
    harness_flags = dict(limit=samples, num_fewshot=num_fewshot, log_samples=log_samples, max_length=max_length,
                         max_gen_toks=max_new_tokens)
    target = Path(target)
    if not target.exists():
        raise ConfigError(f"{target}: no such config file or composition folder")
    use_gpu, cpus, runtime_env, zero_stage, trust, split = gpu, 1.0, {}, 3, False, None
    if target.is_file():
        config = load_config(target)
        composition = config.run_dir / "composition"
        specs = [config.models.anchor, *config.models.augmenting]
        tokenizer = tokenizer or config.models.tokenizer or config.models.anchor.path
        fields = (config.data.prompt_field, config.data.completion_field, config.data.text_field)
        split = config.data.split  # of a saved DatasetDict: the one the run trained and evaluated on
        max_length = max_length or config.data.max_length
        micro_batch_size = micro_batch_size or config.training.micro_batch_size
        max_new_tokens = max_new_tokens or config.training.eval_max_new_tokens
        workers = workers or config.ray.num_workers
        use_gpu, cpus, runtime_env = config.ray.use_gpu, config.ray.cpus_per_worker, config.ray.runtime_env
        address = address or config.ray.address
        zero_stage = config.deepspeed.zero_stage
        run_dir = config.run_dir
        if anchor:
            specs[0] = _spec(anchor, "--anchor", specs[0].dtype, specs[0].trust_remote_code)
        for k, path in enumerate(augmenting or []):
            if k + 1 >= len(specs):
                raise ConfigError(f"--augmenting: the config composes {len(specs) - 1} augmenting model(s), "
                                  f"{len(augmenting)} paths given")
            specs[k + 1] = _spec(path, "--augmenting", specs[k + 1].dtype, specs[k + 1].trust_remote_code)
    else:
        composition, run_dir = target, target.resolve().parent
        manifest = read_manifest(composition)
        sources = [manifest["anchor"].get("source", ""), *(a.get("source", "") for a in manifest["augmenting"])]
        given = [anchor, *(augmenting or [])]
        if augmenting and len(augmenting) != len(manifest["augmenting"]):
            raise ConfigError(f"--augmenting: {composition / MANIFEST} composes {len(manifest['augmenting'])} "
                              f"augmenting model(s), {len(augmenting)} paths given")
        specs = []
        for k, source in enumerate(sources):
            override = given[k] if k < len(given) else None
            key = "--anchor" if k == 0 else "--augmenting"
            if not (override or source):
                raise ConfigError(f"{composition / MANIFEST}: names no path for the "
                                  f"{'anchor' if k == 0 else f'augmenting model {k - 1}'}; pass {key} PATH")
            specs.append(_spec(override or source, key if override else f"{composition / MANIFEST}",
                               dtype or "float32", trust))
        tokenizer = tokenizer or specs[0].path
        # A model that was trained reading its own tokens reads them again: from its folder by default.
        recorded = (manifest.get("tokenizers") or {}).get("augmenting") or []
        for k, identity in enumerate(recorded):
            if identity is not None:
                specs[k + 1] = specs[k + 1].model_copy(update={"tokenizer": specs[k + 1].path})
        fields = (prompt_field or ("prompt" if not text_field else None),
                  completion_field or ("completion" if not text_field else None), text_field)
        max_length, micro_batch_size = max_length or 512, micro_batch_size or 8
        max_new_tokens, workers = max_new_tokens or 32, workers or 1
    if augmenting_tokenizer and len(augmenting_tokenizer) != len(specs) - 1:
        raise ConfigError(f"--augmenting-tokenizer: {len(specs) - 1} augmenting model(s), "
                          f"{len(augmenting_tokenizer)} tokenizers given")
    for k, path in enumerate(augmenting_tokenizer or []):
        specs[k + 1] = specs[k + 1].model_copy(update={"tokenizer": path})
    if text_field:
        fields = (None, None, text_field)
    elif prompt_field or completion_field:
        fields = (prompt_field or fields[0], completion_field or fields[1], None)

    if anchor_only:
        label, model = "anchor", "anchor"
    elif augmenting_only is not None:
        if not 0 <= augmenting_only < len(specs) - 1:
            raise ConfigError(f"--augmenting-only {augmenting_only}: the composition has augmenting models "
                              f"0..{len(specs) - 2}")
        label, model = f"augmenting-{augmenting_only}", "augmenting"
        tokenizer = specs[augmenting_only + 1].tokenizer or tokenizer  # alone, it reads its own tokens
    else:
        label, model = "composition", "composition"
        for file in (composition / MANIFEST, composition / WEIGHTS):
            if not file.is_file():
                raise ConfigError(f"{file}: not found; train the composition first (calm train), or pass "
                                  "--anchor-only / --augmenting-only K")
        check_weights_readable(composition)
        trained = read_manifest(composition)
        _check_bases(trained, specs, composition / MANIFEST)
        _check_tokenizers(trained, tokenizer, specs, composition / MANIFEST)
    for name, value in (("--samples", samples), ("--max-new-tokens", max_new_tokens), ("--workers", workers),
                        ("--micro-batch-size", micro_batch_size), ("--max-length", max_length)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    harness = None
    if tasks is not None:
        from launcher.eval.harness import check_tasks

        harness = check_tasks(tasks, **harness_flags)
    files = [] if data is None else [Path(d) for d in (data if isinstance(data, list | tuple) else [data])]
    for file in files:
        _check_data(file, fields, split)
    if len({f.stem for f in files}) < len(files):  # each result is written to STEM.MODEL.json
        raise ConfigError(f"--data: {', '.join(map(str, files))}: two files with the same name would write one result")
    job = EvalJob(model=model, augmenting_index=augmenting_only or 0, composition=str(composition.resolve()),
                  anchor=specs[0], augmenting=specs[1:], tokenizer=str(tokenizer),
                  data=[str(f.resolve()) for f in files], harness=harness, split=split,
                  prompt_field=fields[0], completion_field=fields[1], text_field=fields[2], max_length=max_length,
                  samples=samples, max_new_tokens=max_new_tokens, micro_batch_size=micro_batch_size,
                  zero_stage=zero_stage, use_gpu=use_gpu)
    return Plan(job, workers, cpus, address, runtime_env, Path(output_dir) if output_dir else run_dir / "eval", label)


def _check_bases(manifest: dict, specs: list[ModelSpec], file: Path) -> None:
    """The given base models have the dimensions the composition was trained on."""
    from transformers import AutoConfig

    from calm_dist.model.architectures import dims_from_config

    expected = [manifest["anchor"], *manifest["augmenting"]]
    if len(expected) != len(specs):
        raise CompositionError(f"{file}: composes {len(expected) - 1} augmenting model(s), "
                               f"{len(specs) - 1} given")
    for k, (want, spec) in enumerate(zip(expected, specs, strict=True)):
        role = "anchor" if k == 0 else f"augmenting model {k - 1}"
        have = dims_from_config(AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)).to_json()
        for key, value in have.items():
            if key in want and want[key] != value:
                raise CompositionError(f"{file}: the {role} has {key}={want[key]!r} there but {spec.path} has "
                                       f"{value!r}: not the base model this composition was trained on")


def _check_tokenizers(manifest: dict, tokenizer: str, specs: list[ModelSpec], file: Path) -> None:
    """The tokenizers given are those the composition was trained with (or it was trained with none of
    its own, and none is given)."""
    from transformers import AutoTokenizer

    from calm_dist.model.composition_checkpoint import check_tokenizers

    def load(path: str, key: str):
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}: {path}: cannot load a tokenizer ({err})") from None

    given = [load(tokenizer, "--tokenizer"), *(load(s.tokenizer, "--augmenting-tokenizer") if s.tokenizer else None
                                              for s in specs[1:])]
    check_tokenizers(manifest, given if any(t is not None for t in given[1:]) else None, len(specs) - 1, file)


def _check_data(path: Path, fields: tuple, split: str | None = None) -> None:
    import datasets

    from calm_dist.data.records import DataError, check_fields, load_records

    # Before the log exists (its folder comes from the plan): a peek at the file, without a progress bar.
    datasets.disable_progress_bars()
    try:
        records = load_records(path, split)
        check_fields(records, path, prompt_field=fields[0], completion_field=fields[1], text_field=fields[2])
    except DataError as err:
        raise ConfigError(f"--data: {err}") from None
    finally:
        datasets.enable_progress_bars()


def evaluate(target: str | Path, data: str | Path, *, progress: bool = True, **flags) -> dict:
    """Score a composition (or, with anchor_only=True / augmenting_only=K, one base model alone) on `data`
    and write the result as JSON; returns it: exact_match (None for plain text data), loss, samples,
    model, and where the JSON went (`output`). Flags as plan(). Starts a local Ray cluster unless one is
    running in this process or an address is given."""
    return run_plan(plan(target, data, **flags), progress=progress)[0]


def evaluate_files(target: str | Path, files: list[str | Path], *, progress: bool = True, **flags) -> list[dict]:
    """evaluate() on several data files in one launch (the models are loaded once): one result each."""
    return run_plan(plan(target, list(files), **flags), progress=progress)


def run_plan(p: Plan, progress: bool = True) -> list[dict]:
    from launcher.eval.worker import eval_worker

    started = time.perf_counter()
    job = p.job
    counts: list[int] = []

    def total() -> int:
        counts.extend(_record_count(job, file) for file in job.data)
        chunks = sum(math.ceil(math.ceil(count / job.micro_batch_size) / p.workers) for count in counts)
        return chunks * (1 if job.text_field else 2)

    per_file = launch(p, eval_worker, total if progress else None)
    if not counts:  # no progress bar asked for them
        total()
    wall_s = round(time.perf_counter() - started, 1)  # the launch's, shared by its files
    results = []
    p.output_dir.mkdir(parents=True, exist_ok=True)
    for file, count, metrics in zip(job.data, counts, per_file, strict=True):
        result = {
            "model": p.label,
            "exact_match": metrics.get("eval_exact_match"),
            "loss": metrics["eval_loss"],
            "samples": metrics.get("eval_samples", count),
            "data": file,
            "composition": job.composition if p.label == "composition" else None,
            "anchor": job.anchor.path,
            "augmenting": [s.path for s in job.augmenting],
            "max_new_tokens": job.max_new_tokens,
            "workers": p.workers,
            "examples": metrics.get("eval_examples", []),
            "wall_s": wall_s,
        }
        output = p.output_dir / f"{Path(file).stem}.{p.label}.json"
        staging = output.with_name(f".{output.name}.tmp")
        staging.write_text(json.dumps(result, indent=2) + "\n")
        staging.replace(output)
        result["output"] = str(output)
        results.append(result)
    return results


def _record_count(job: EvalJob, file: str) -> int:
    from calm_dist.data.records import load_records

    count = len(load_records(file, job.split))
    return min(count, job.samples) if job.samples else count


def table(rows: list[dict]) -> str:
    """Results as a table for people: one row per evaluated model and data file."""
    lines = [f"{'model':<14} {'exact match':>11} {'loss':>8} {'samples':>8}  data"]
    for row in rows:
        match = "-" if row["exact_match"] is None else f"{row['exact_match']:.3f}"
        lines.append(f"{row['model']:<14} {match:>11} {row['loss']:>8.4f} {row['samples']:>8}  {Path(row['data']).name}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from launcher.runtime.quiet import log_path, quiet_output

    p = plan(args.target, args.data, tasks=args.tasks, num_fewshot=args.num_fewshot, log_samples=args.log_samples,
             anchor_only=args.anchor_only, augmenting_only=args.augmenting_only,
             samples=args.samples, max_new_tokens=args.max_new_tokens, workers=args.workers,
             micro_batch_size=args.micro_batch_size, anchor=args.anchor, augmenting=args.augmenting,
             tokenizer=args.tokenizer, augmenting_tokenizer=args.augmenting_tokenizer, dtype=args.dtype,
             prompt_field=args.prompt_field, completion_field=args.completion_field, text_field=args.text_field,
             max_length=args.max_length,
             gpu=args.gpu, address=args.address, output_dir=args.output_dir)
    with quiet_output(log_path(p.output_dir, f"eval-{p.label}"), verbose=args.verbose):
        if args.tasks:
            from launcher.eval.harness import run_tasks

            output, harness_table = run_tasks(p)
            print(harness_table)
            print(f"results: {output}")
            return 0
        results = run_plan(p)
        print(table(results))
        for result in results:
            for example in result["examples"][:3]:
                print(f"  {example['prompt']!r} -> {example['completion']!r} (expected {example['target']!r})")
        print("results: " + ", ".join(result["output"] for result in results))
    return 0
