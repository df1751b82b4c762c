"""CALM on a real pretrained anchor, end to end (`calm demo real`, bench/real_anchor.py).

1. data: a generated fictional world (launcher.real_anchor.world), D_C and the eval sets (data.py);
2. m_A, the specialist, trained here from scratch on the world's statements with its own tokenizer
   and cached (specialist.py); the anchor m_B is SmolLM2-135M-Instruct, the real-checkpoint asset;
3. the composition, trained through the real path: `calm train` (Ray Train workers running DeepSpeed
   ZeRO-3 on the embedded local cluster) on D_C, questions about 20 % of the people;
4. scores: `calm eval` for the composition's answers; each model alone and LoRA on m_B with as many
   trainable parameters, trained on the same D_C for the same steps, in one process; and the anchor's
   own ability (prose loss, general prompts) for m_B, LoRA and the composition, by one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from launcher import REPO
from launcher.real_anchor import data as world_data
from launcher.real_anchor.specialist import SpecialistPlan
from launcher.train_config import TrainConfig, load_config

CONFIG = REPO / "configs" / "real-anchor.yaml"
ROOT = REPO / "runs" / "real-anchor"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Design:
    """The experiment's sizes. Changing any of them changes the cache key of m_A."""
    people: int = 2000
    dc_fraction: float = 0.2
    specialist: SpecialistPlan = field(default_factory=SpecialistPlan)
    eval_questions: int = 300
    prose: int = 480  # D_C's prose passages (launcher.real_anchor.ordinary), beside its 3 questions per D_C person
    answer_tokens: int = 32  # how far the anchor continues each factual prompt of D_C (its own answers)
    # `calm train` settings that differ from configs/real-anchor.yaml: (dotted key, value) pairs.
    training: tuple[tuple[str, object], ...] = ()


@dataclass
class Assets:
    folder: Path
    world: object
    anchor: Path
    specialist: Path
    files: dict[str, Path]
    specialist_training: dict
    specialist_reused: bool  # m_A of this design was already trained under folder


def prepare(folder: Path, seed: int, design: Design, log: Log, anchor: Path | None = None) -> Assets:
    """Data files and m_A under folder (m_A reused when its stamp matches); the anchor asset."""
    from calm_dist.testing.real_checkpoint import smollm2
    from launcher.real_anchor import specialist, world
    from launcher.real_anchor.ordinary import ordinary_words

    anchor = anchor or smollm2()
    link = folder.parent / "smollm2"  # where configs/real-anchor.yaml finds the anchor, for `calm train` by hand
    if not link.exists() and not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(anchor, target_is_directory=True)
    the_world = world.make_world(seed, design.people, dc_fraction=design.dc_fraction, reserved=ordinary_words())
    answers = _anchor_answers(folder.parent / "anchor-answers.json", anchor, design.answer_tokens, log)
    files = world_data.write_data(the_world, folder / "data", design.eval_questions, design.prose, answers)
    target = folder / "specialist"
    # The names too: the words they may not be come from this Python's standard library.
    names = hashlib.sha256(" ".join(p.name for p in the_world.people).encode()).hexdigest()
    identity = {"seed": seed, "people": design.people, "plan": asdict(design.specialist), "names": names}
    if (stamp := _stamped(target / "trained.json", identity)) is not None:
        log(f"m_A: reusing {target}")
        return Assets(folder, the_world, anchor, target, files, stamp["training"], True)
    tokenizer = world.specialist_tokenizer(the_world)
    model, info = specialist.train_specialist(design.specialist, world.statements(the_world), tokenizer, 1000 * seed + 1)
    info["recall"] = specialist.recall(model, tokenizer, the_world)
    partial = folder / "specialist.partial"  # renamed into place whole: never half a model at `target`
    shutil.rmtree(partial, ignore_errors=True)
    specialist.save(model, tokenizer, partial)
    _write_stamp(partial / "trained.json", identity, training=info)
    shutil.rmtree(target, ignore_errors=True)  # this experiment's own m_A of another design
    os.replace(partial, target)
    layers = design.specialist.layers
    log(f"trained m_A ({layers} layer{'s' if layers > 1 else ''} x {design.specialist.width}, own word-level tokenizer): "
        f"loss {info['final_loss']:.3f} in {info['seconds']:.0f} s; recalls " +
        ", ".join(f"{k} {100 * v:.0f} %" for k, v in info["recall"].items()))
    return Assets(folder, the_world, anchor, target, files, info, False)


def _anchor_answers(cache: Path, anchor: Path, max_new_tokens: int, log: Log) -> list[dict]:
    """The anchor's own continuations of D_C's factual prompts: the same for every seed, so computed
    once per anchor and kept in `cache`."""
    from launcher.real_anchor.ordinary import anchor_answers, factual_prompts

    identity = {"anchor": str(anchor), "prompts": factual_prompts(), "max_new_tokens": max_new_tokens}
    if (cached := _stamped(cache, identity)) is not None:
        return cached["records"]
    start = time.perf_counter()
    records = anchor_answers(*_load(anchor), max_new_tokens)
    _write_stamp(cache, identity, records=records)
    log(f"the anchor's own answers to {len(records)} factual prompts, for D_C: {time.perf_counter() - start:.0f} s")
    return records


def _stamped(stamp: Path, identity: dict) -> dict | None:
    """What `stamp` holds, if it was written for this identity (m_A, the anchor's answers and the
    composition are each reused only when what made them is unchanged); else None."""
    identity = json.loads(json.dumps(identity))  # tuples as lists, as read back
    if not stamp.exists():
        return None
    held = json.loads(stamp.read_text())
    return held if held.get("identity") == identity else None


def _write_stamp(stamp: Path, identity: dict, **payload: object) -> None:
    """Written whole (renamed into place), so a stamp never describes half a result."""
    stamp.parent.mkdir(parents=True, exist_ok=True)
    partial = stamp.with_suffix(".partial")
    partial.write_text(json.dumps({"identity": identity, **payload}, indent=1))
    os.replace(partial, stamp)


def training_config(config_path: Path, assets: Assets, seed: int, run_name: str, output_dir: Path, storage: Path,
                    settings: tuple[tuple[str, object], ...] = ()) -> TrainConfig:
    overrides = {
        **dict(settings),
        "name": run_name,
        "models.anchor.path": str(assets.anchor),
        "models.augmenting": [{"path": str(assets.specialist), "tokenizer": str(assets.specialist), "dtype": "float32"}],
        "data.train": str(assets.files["composition_train"]),
        "data.eval": str(assets.files[world_data.EVAL_SETS["heldout"]]),
        "training.seed": seed,
        "output_dir": str(output_dir),
        "ray.storage_path": str(storage),
    }
    return load_config(config_path, overrides)


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _questions(assets: Assets) -> dict[str, list[dict]]:
    return {suffix: world_data.read_jsonl(assets.files[stem]) for suffix, stem in world_data.EVAL_SETS.items()}


def _answers(model, tokenizer, assets: Assets) -> dict[str, float]:
    """Exact match of a plain model's one-token answers (every answer is one anchor token; m_A's are one
    of its own), by the decoding loop `calm eval` uses."""
    from launcher.kv_arithmetic.local_eval import exact_match

    return {suffix: exact_match(model, tokenizer, records, max_new_tokens=1)
            for suffix, records in _questions(assets).items()}


def run_experiment(root: Path, seed: int, log: Log, config_path: Path = CONFIG, design: Design = Design(),
                   retrain: bool = False, anchor: Path | None = None) -> dict:
    """Everything for one seed under root/seed-N; returns the flat results (see report.py). The embedded
    Ray cluster `calm train` starts is stopped at the end (a caller's own Ray is left running)."""
    import ray

    from launcher.runtime.ray_start import stop_ray

    ours = not ray.is_initialized()
    try:
        return _run(root, seed, log, config_path, design, retrain, anchor)
    finally:
        if ours:
            stop_ray()


def _run(root: Path, seed: int, log: Log, config_path: Path, design: Design, retrain: bool,
         anchor: Path | None) -> dict:
    from launcher.eval.command import evaluate_files
    from launcher.general_ability import ALL_GENERAL_PROMPTS, general_scores
    from launcher.kv_arithmetic.lora_baseline import train_lora
    from launcher.preflight import preflight
    from launcher.train.command import train

    start = time.perf_counter()
    folder = root / f"seed-{seed}"
    assets = prepare(folder, seed, design, log, anchor)
    run_name = f"composition-seed-{seed}"
    config = training_config(config_path, assets, seed, run_name, root / "runs", root / "ray", design.training)
    composition = Path(config.output_dir) / run_name / "composition"
    # The composition is reused only if trained on this very D_C with this very config.
    identity = {"config": config.model_dump(mode="json"),
                "data": hashlib.sha256(assets.files["composition_train"].read_bytes()).hexdigest()}
    stamp = Path(config.output_dir) / run_name / "experiment.json"
    if retrain or not (composition / "composition.json").exists() or _stamped(stamp, identity) is None:
        for old in (Path(config.output_dir) / run_name, Path(config.ray.storage_path) / run_name):
            shutil.rmtree(old, ignore_errors=True)  # this seed's earlier run belongs to the experiment
        preflight(config)  # bad input fails here, in one line, before any worker starts
        if train(config) != 0:
            raise RuntimeError(f"composition training failed; see {Path(config.output_dir) / run_name}")
        _write_stamp(stamp, identity)
    else:
        log(f"composition: reusing {composition} (pass --retrain to train it again)")
    trained_s = time.perf_counter() - start

    results: dict = {"seed": seed}
    stems = list(world_data.EVAL_SETS.values())
    evaluated = evaluate_files(composition, [assets.files[s] for s in stems], workers=config.ray.num_workers,
                               max_new_tokens=1, micro_batch_size=32, progress=False)
    for suffix, result in zip(world_data.EVAL_SETS, evaluated, strict=True):
        results[f"composed_{suffix}"] = result["exact_match"]
        log(f"calm eval {suffix}: exact match {result['exact_match']:.3f}")

    anchor_model, anchor_tokenizer = _load(assets.anchor)
    specialist_model, specialist_tokenizer = _load(assets.specialist)
    results.update({f"anchor_{k}": v for k, v in _answers(anchor_model, anchor_tokenizer, assets).items()})
    results.update({f"specialist_{k}": v for k, v in _answers(specialist_model, specialist_tokenizer, assets).items()})
    anchor_general = general_scores(anchor_model, anchor_tokenizer, ALL_GENERAL_PROMPTS)
    anchor_completions = anchor_general.pop("general_completions")
    results.update({f"anchor_{k}": v for k, v in anchor_general.items()})

    from calm_dist.model.composition_checkpoint import load_composition

    composed = load_composition(composition, anchor_model, [specialist_model],
                                tokenizers=[anchor_tokenizer, specialist_tokenizer]).eval()
    results.update(general_results("composed", composed, anchor_tokenizer, anchor_completions))
    parameters = sum(p.numel() for p in composed.composition.parameters())
    del composed

    import datasets

    from calm_dist.data.tokenization import tokenize_records

    rows = list(tokenize_records(datasets.Dataset.from_list(world_data.read_jsonl(assets.files["composition_train"])),
                                 anchor_tokenizer, max_length=config.data.max_length, prompt_field="prompt",
                                 completion_field="completion", keep_anchor_field=config.data.keep_anchor_field))
    # LoRA where the composition acts: the anchor layers from its lowest connection up, so both change
    # the same computation, with as many parameters, and cost the same backward pass.
    lowest = max(0, min((c[2] for c in config.composition.connections or ()), default=0))
    lora_layers = range(lowest, anchor_model.config.num_hidden_layers)
    lora, rank, lora_parameters, lora_s = train_lora(_load(assets.anchor)[0], rows, config.training, parameters, seed,
                                                     pad_token_id=anchor_tokenizer.pad_token_id, layers=lora_layers)
    log(f"LoRA baseline: rank {rank} on anchor layers {lowest}-{lora_layers[-1]}, {lora_parameters:,} trainable "
        f"parameters, {config.training.steps} steps in {lora_s:.0f} s")
    results.update({f"lora_{k}": v for k, v in _answers(lora, anchor_tokenizer, assets).items()})
    results.update(general_results("lora", lora, anchor_tokenizer, anchor_completions))
    results.update(
        people=design.people, dc_people=len(assets.world.dc_people), heldout_people=len(assets.world.heldout_people),
        eval_questions=design.eval_questions, general_prompts=len(ALL_GENERAL_PROMPTS), composition_parameters=parameters, lora_parameters=lora_parameters,
        lora_rank=rank, lora_layers=[lora_layers[0], lora_layers[-1]], steps=config.training.steps, specialist=assets.specialist_training,
        specialist_cached=assets.specialist_reused, train_s=round(trained_s, 1), lora_s=round(lora_s, 1),
        wall_s=round(time.perf_counter() - start, 1))
    return results


def general_results(prefix: str, model, tokenizer, anchor_completions: list[str]) -> dict:
    """A model's general scores, and the general prompts it answers otherwise than SmolLM2 (right where
    SmolLM2 is wrong, or wrong where it is right): which of the anchor's answers a change cost."""
    from launcher.general_ability import ALL_GENERAL_PROMPTS, changed_answers, general_scores

    scores = general_scores(model, tokenizer, ALL_GENERAL_PROMPTS)
    changed = changed_answers(anchor_completions, scores.pop("general_completions"), ALL_GENERAL_PROMPTS)
    return {**{f"{prefix}_{k}": v for k, v in scores.items()},
            f"{prefix}_general_prompts_changed": [{"prompt": c["prompt"], "smollm2": c["base"], prefix: c["other"],
                                                   "lost": c["lost"]} for c in changed]}


# Issue #23's targets, per seed; the budget is for the whole run from nothing, or with m_A cached.
TARGETS: dict[str, Callable[[dict], bool]] = {
    "composed_heldout >= 0.60": lambda r: r["composed_heldout"] >= 0.60,
    "baselines_heldout < 0.10": lambda r: max(r["anchor_heldout"], r["specialist_heldout"], r["lora_heldout"]) < 0.10,
    "composed general loss within 2 % of m_B's": lambda r: r["composed_general_loss"] <= 1.02 * r["anchor_general_loss"],
    "composed general exact match within 2 points of m_B's":
        lambda r: r["composed_general_exact_match"] >= r["anchor_general_exact_match"] - 0.02,
    "wall_s within budget": lambda r: r["wall_s"] <= (2100 if r["specialist_cached"] else 2700),
}


def targets_missed(r: dict) -> list[str]:
    return [name for name, met in TARGETS.items() if not met(r)]
