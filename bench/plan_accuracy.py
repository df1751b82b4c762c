"""How close `calm plan` comes to the memory workers really use, on CPU. Prints JSON.

For each case it computes the plan (launcher.plan.command, from the model configs alone) and measures the
same run, then compares the two per worker; target: every case within 20 %.

What is measured, per training worker process: the peak of its resident memory (VmRSS, sampled
every millisecond by a thread of the worker) minus its baseline, VmRSS after imports, the process
group and DeepSpeed are set up and before any model tensor exists. That is the memory the run's
tensors take on top of the runtime; it includes file-backed pages, because transformers maps an
augmenting model's weights straight from its safetensors file (pages never read, such as its unused
LM head, are not resident). For merges, the peak of RssAnon + RssShmem above the baseline: the
merge's own memory, private or shared (its input read buffers are shared anonymous maps, which
RssAnon does not count), not the file pages the kernel can drop. Workers run with
MALLOC_MMAP_THRESHOLD_=1MiB, so glibc returns freed tensors of 1 MiB or more to the system at once and
RSS follows the live tensors (as a GPU's max_memory_allocated does) rather than what the heap kept.
What is predicted: the plan's total minus its stated runtime allowance. The baseline is printed
beside the allowance (the runtime allowance the plan states for a CPU worker).

Training cases run what a `calm train` worker runs (bench/plan_worker.py under torchrun: the Trainer of
calm_dist.distributed.trainer on a training config written here, with a tokenizer beside the models and
records of random words that fill every micro-batch; in pipelined mode an augmenting rank serving states), for
3 steps and the final checkpoint. Merge cases run `calm merge` in a subprocess
sampled the same way from outside; its baseline is a process that imports the same modules. The
plan's measured constants (engine and exchange workspaces) were set from these runs.

    .venv/bin/python bench/plan_accuracy.py [--only small-colocated-2] [--workdir /tmp/calm-plan-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.20
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
# name: anchor layers x width, augmenting layers x width, vocabulary, micro batch x length
SIZES = {"tiny": ((4, 512), (4, 384), 16384, (2, 128)), "small": ((8, 1024), (8, 512), 8192, (2, 256))}
CASES = [
    # size, mode, anchor workers, activation checkpointing
    ("tiny", "colocated", 1, False),
    ("tiny", "pipelined", 2, True),
    ("small", "colocated", 1, False),
    ("small", "colocated", 1, True),
    ("small", "colocated", 2, False),
    ("small", "colocated", 2, True),
    ("small", "pipelined", 1, False),
    ("small", "pipelined", 1, True),
    ("small", "pipelined", 2, False),
    ("small", "pipelined", 2, True),
]


def make_models(work: Path, size: str) -> Path:
    """The size's two models, each with a tokenizer over its whole vocabulary saved beside it, and
    train.jsonl: records of random words long enough that every sequence fills the micro-batch length."""
    from calm_dist.testing.tiny_models import tiny_model

    folder = work / size
    (anchor_layers, anchor_width), (aug_layers, aug_width), vocab, (_, length) = SIZES[size]
    if not (folder / "augmenting" / "config.json").exists():
        tiny_model("llama", layers=anchor_layers, width=anchor_width, heads=anchor_width // 64, vocab=vocab,
                   seed=0).save_pretrained(folder / "anchor")
        tiny_model("llama", layers=aug_layers, width=aug_width, heads=aug_width // 64, vocab=vocab,
                   seed=1).save_pretrained(folder / "augmenting")
    if not (folder / "train.jsonl").exists():
        for name in ("anchor", "augmenting"):
            vocabulary_tokenizer(vocab).save_pretrained(folder / name)
        rng = random.Random(0)
        (folder / "train.jsonl").write_text("".join(
            json.dumps({"text": " ".join(f"t{rng.randrange(4, vocab)}" for _ in range(length))}) + "\n"
            for _ in range(32)))
    return folder


def vocabulary_tokenizer(vocab_size: int):
    """A word-level tokenizer with one word per id: the special tokens of
    calm_dist.testing.tokenizers.tiny_tokenizer, then `t4` ... `t{vocab_size - 1}`. Random words reach
    every row of the models' embeddings, as real text does. The augmenting models' weights are mapped
    from their files, so rows never looked up would never be resident (tiny_tokenizer reaches ~100 ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from calm_dist.testing.tokenizers import SPECIAL_TOKENS

    specials = list(SPECIAL_TOKENS.values())
    words = [*specials, *(f"t{i}" for i in range(len(specials), vocab_size))]
    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)},
                                         unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=4096, **SPECIAL_TOKENS)


def train_config(folder: Path, case: dict):
    from launcher.train_config import TrainConfig

    return TrainConfig.model_validate({
        "name": "plan-bench",
        "models": {"anchor": {"path": str(folder / "anchor"), "dtype": "float32"},
                   "augmenting": [{"path": str(folder / "augmenting"), "dtype": "float32"}]},
        "composition": {"every_n": case["every_n"]},
        "data": {"train": str(folder / "train.jsonl"), "text_field": "text", "max_length": case["length"]},
        "training": {"steps": case["steps"], "micro_batch_size": case["micro_batch"],
                     "global_batch_size": case["micro_batch"] * case["anchor_workers"], "log_every": 1,
                     "schedule": {"kind": "constant"}, "optimizer": {"grad_clip": None}},
        "deepspeed": {"activation_checkpointing": case["activation_checkpointing"]},
        "placement": {"mode": case["mode"], "prefetch": case["prefetch"]},
        "ray": {"num_workers": case["anchor_workers"]},
        "output_dir": str(folder / "runs"),
    })


def training_case(work: Path, size: str, mode: str, workers: int, checkpointing: bool, port: int) -> dict:
    from calm_dist.distributed.memory_plan import train_plan
    from launcher.plan.command import train_setup

    folder = make_models(work, size)
    batch, length = SIZES[size][3]
    name = f"{size}-{mode}-{workers}" + ("-ckpt" if checkpointing else "")
    spec = {"every_n": 4, "mode": mode, "anchor_workers": workers, "micro_batch": batch, "length": length,
            "steps": 3, "activation_checkpointing": checkpointing, "prefetch": 2}
    config = train_config(folder, spec)
    out = work / f"{name}.result"
    case_file = work / f"{name}.json"
    case_file.write_text(json.dumps({"config": config.model_dump(mode="json"), "out": str(out)}))
    plans = {p.role.split()[0]: p for p in train_plan(train_setup(config, gpu=False))}
    processes = workers + (config.placement.augmenting_workers if mode == "pipelined" else 0)
    env = {**os.environ, **MALLOC, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
         str(ROOT / "bench/plan_worker.py"), str(case_file)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
    per_worker = []
    for rank in range(processes):
        measured = json.loads(Path(f"{out}.{rank}").read_text())
        plan = plans[measured["role"]]
        predicted = plan.total - plan.term("runtime allowance")
        per_worker.append({
            "rank": rank, "role": measured["role"], "predicted_bytes": predicted,
            "measured_bytes": measured["measured_bytes"], "baseline_bytes": measured["baseline_bytes"],
            "runtime_allowance_bytes": plan.term("runtime allowance"),
            "error": round(predicted / measured["measured_bytes"] - 1, 3),
            "largest_term": plan.largest.name if plan.largest.name != "runtime allowance" else
            max(plan.terms[:-1], key=lambda t: t.bytes).name,
        })
    return {"case": name, "workers": per_worker}


# --------------------------------------------------------------------------------------------------
# Merges


def _anonymous_memory(pid: int) -> int:
    """RssAnon + RssShmem: what the process holds that is not a file's pages."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return sum(int(fields.get(key, "0 kB").split()[0]) * 1024 for key in ("RssAnon", "RssShmem"))


def sampled_peak(command: list[str]) -> int:
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **MALLOC, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _anonymous_memory(proc.pid))
        time.sleep(0.001)
    output = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{output[-4000:]}")
    return peak


def merge_case(work: Path, name: str, config: dict) -> dict:
    from launcher.plan.command import merge_setup
    from merge.merge_config import validate_config
    from merge.planning.memory import loss_terms, merge_terms

    folder = work / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = {**config, "output": {"path": str(folder / "merged"), **config.get("output", {})}}
    (folder / "merge.yaml").write_text(json.dumps(config))
    cfg = validate_config(json.loads(json.dumps(config)), base=folder)
    setup, _ = merge_setup(cfg)
    plan = loss_terms(setup) if cfg.weights_from_examples else merge_terms(setup)
    if cfg.weights_from_examples:  # the merge step is small beside the loss step: the plan's larger figure
        plan = max(plan, merge_terms(setup), key=lambda p: p.total)
    predicted = plan.total - plan.term("runtime allowance")
    # Baseline: a process importing what the merge imports (and transformers when it scores examples).
    imports = "import torch, merge.job, merge.execution.shard" + (", transformers, merge.cocktail.losses" if cfg.weights_from_examples else "")
    baseline = sampled_peak([sys.executable, "-c", f"{imports}; import time; time.sleep(0.5)"])
    peak = sampled_peak([sys.executable, "-m", "launcher.cli", "merge", str(folder / "merge.yaml"), "--no-progress"])
    measured = peak - baseline
    return {"case": name, "workers": [{
        "rank": 0, "role": plan.role, "predicted_bytes": predicted, "measured_bytes": measured,
        "baseline_bytes": baseline, "runtime_allowance_bytes": plan.term("runtime allowance"),
        "error": round(predicted / measured - 1, 3), "largest_term": max(plan.terms[:-1], key=lambda t: t.bytes).name,
    }]}


def merge_cases(work: Path) -> list[dict]:
    import torch
    from safetensors.torch import save_file

    from calm_dist.testing.tiny_models import tiny_model
    from calm_dist.testing.tokenizers import tiny_tokenizer

    inputs = work / "merge-inputs"
    names = ["base", "one", "two"]
    if not (inputs / "two" / "config.json").exists():
        for seed, name in enumerate(names):
            model = tiny_model("llama", layers=4, width=1024, heads=16, vocab=8192, seed=seed)
            model.save_pretrained(inputs / name)
            tiny_tokenizer().save_pretrained(inputs / name)
            # bf16 copies for the streaming merge
            state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
            (inputs / f"{name}-bf16").mkdir(parents=True, exist_ok=True)
            save_file(state, inputs / f"{name}-bf16" / "model.safetensors", metadata={"format": "pt"})
            model.config.save_pretrained(inputs / f"{name}-bf16")
        (inputs / "examples.jsonl").write_text("".join(
            json.dumps({"input": f"{i} plus {i} is", "output": f" {2 * i}, and {i} times {i} is {i * i}."}) + "\n"
            for i in range(8)))
    streaming = {"method": "linear", "models": [{"path": str(inputs / f"{n}-bf16")} for n in names],
                 "memory_budget": "1GiB", "output": {"max_shard_size": "200MB"}}
    examples = {"method": "linear", "models": [{"path": str(inputs / n)} for n in names],
                "weights_from_examples": {"examples": str(inputs / "examples.jsonl"), "batch_size": 4,
                                          "max_length": 64}}
    return [merge_case(work, "merge-streaming-bf16", streaming), merge_case(work, "merge-weights-from-examples", examples)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/calm-plan-bench"))
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for port, (size, mode, workers, checkpointing) in enumerate(CASES):
        name = f"{size}-{mode}-{workers}" + ("-ckpt" if checkpointing else "")
        if args.only and args.only not in name:
            continue
        results.append(training_case(args.workdir, size, mode, workers, checkpointing, 29740 + port))
    if not args.only or "merge" in args.only:
        results += merge_cases(args.workdir)
    errors = [w["error"] for r in results for w in r["workers"]]
    print(json.dumps({
        "measured": "peak VmRSS (training) or RssAnon + RssShmem (merges) minus the runtime's baseline, per worker process "
                    "(MALLOC_MMAP_THRESHOLD_=1MiB)",
        "predicted": "calm plan's total minus its runtime allowance",
        "load_average": os.getloadavg()[0],
        "cases": results,
        "worst_error": max(errors, key=abs) if errors else None,
        "target": TARGET,
        "all_within_target": all(abs(e) <= TARGET for e in errors),
    }, indent=1))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
