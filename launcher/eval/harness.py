"""`calm eval TARGET --tasks TASK...`: lm-evaluation-harness tasks on the workers of `calm eval`.

The tasks are the harness's (by name) or the user's (a path to a task YAML). They are checked on the
driver, then every Ray Train worker runs the harness over them with the composition (or one base model
alone) as its model (launcher.eval.harness_model), the anchor partitioned under ZeRO-3; the requests
are split across the workers inside the model. Rank 0's results come back to the driver, which writes
them as the harness's own command line does (results_DATE.json, samples_TASK_DATE.jsonl with
--log-samples) and the harness's table beside them (table_DATE.md), in OUTPUT_DIR/harness/MODEL/.

The harness (`pip install 'calm-dist[eval]'`) is imported only here and where the tasks run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from launcher.eval.job import HarnessTasks
from launcher.train_config import ConfigError


def local_task(folder: Path, name: str, records: list[dict], body: str) -> Path:
    """A harness task YAML over records written as a local JSON file beside it (no download); body: the
    task's settings after its data (output_type, doc_to_text, metric_list, ...)."""
    import json

    (folder / f"{name}.json").write_text(json.dumps(records))
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.json\n"
                    f"test_split: test\n{body}")
    return path


def _is_file_spec(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) or Path(task).is_file()


def check_tasks(tasks: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                log_samples: bool = False, max_length: int | None = None,
                max_gen_toks: int | None = None) -> HarnessTasks:
    """The tasks resolved (files as absolute paths) and checked: ConfigError names the task at fault.
    A task file is built here, so a data file it cannot read is found before any worker starts."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("--tasks: lm-evaluation-harness is not installed: pip install 'calm-dist[eval]'") from None
    for name, value, least in (("--samples", limit, 1), ("--num-fewshot", num_fewshot, 0),
                               ("--max-length", max_length, 2), ("--max-new-tokens", max_gen_toks, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{name} {value}: must be at least {least}")
    files = [t for t in tasks if _is_file_spec(t)]
    names = [t for t in tasks if not _is_file_spec(t)]
    for task in files:
        if not Path(task).is_file():
            raise ConfigError(f"--tasks: {task}: no such task file")
    resolved = [str(Path(t).resolve()) if _is_file_spec(t) else t for t in tasks]
    with _quiet_harness():
        _check_known(tasks, resolved, names, TaskManager(include_defaults=bool(names)))
    return HarnessTasks(tasks=resolved, builtin=bool(names), limit=limit, num_fewshot=num_fewshot,
                        log_samples=log_samples, max_length=max_length, max_gen_toks=max_gen_toks or 256)


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """The driver's look at the tasks says nothing unless it fails (the log does not exist yet): the
    harness's notes on each task and the datasets' progress bars stay off the terminal."""
    import datasets

    harness = logging.getLogger("lm_eval")
    level = harness.level
    harness.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        harness.setLevel(level)
        datasets.enable_progress_bars()


def _check_known(tasks: list[str], resolved: list[str], names: list[str], manager) -> None:
    for task in names:
        if task not in manager.all_tasks:
            close = [n for n in manager.all_tasks if task.lower() in n.lower()][:5]
            raise ConfigError(f"--tasks: {task}: not a task of lm-evaluation-harness"
                              + (f" (did you mean {', '.join(close)}?)" if close else "")
                              + "; give a task name or the path of a task YAML")
    for task, path in zip(tasks, resolved, strict=True):
        if _is_file_spec(task):
            try:
                manager.load([path])
            except Exception as err:  # the harness raises many kinds for a task it cannot build
                raise ConfigError(f"--tasks: {task}: not a task the harness can load: {type(err).__name__}: {err}") from None


def write_results(results: dict, output_dir: Path, label: str, model_args: dict) -> tuple[Path, str]:
    """Write the results as the harness's command line does, under output_dir/harness/label/, and the
    harness's table beside them: (the results JSON, the table)."""
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    results = dict(results)
    samples = results.pop("samples", None)
    tracker = EvaluationTracker(output_path=str(output_dir / "harness"))
    # The folder is named after model_args' "model" entry.
    tracker.general_config_tracker.log_experiment_args(model_source="calm", model_args={"model": label, **model_args},
                                                       system_instruction=None, chat_template=None,
                                                       fewshot_as_multiturn=False)
    tracker.save_results_aggregated(results=results, samples=samples)
    folder = output_dir / "harness" / tracker.general_config_tracker.model_name_sanitized
    if samples:
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    table = make_table(results) + (make_table(results, "groups") if results.get("groups") else "")
    (folder / f"table_{tracker.date_id}.md").write_text(table)
    return folder / f"results_{tracker.date_id}.json", table


def run_tasks(p) -> tuple[Path, str]:
    """Launch the workers of plan `p` (launcher.eval.command.plan with tasks) and write what they found."""
    from launcher.eval.launch import launch
    from launcher.eval.worker import harness_worker

    results = launch(p, harness_worker, progress_total=None)
    model_args = {"composition": p.job.composition if p.label == "composition" else None,
                  "anchor": p.job.anchor.path, "augmenting": [s.path for s in p.job.augmenting],
                  "workers": p.workers}
    return write_results(results, p.output_dir, p.label, model_args)
