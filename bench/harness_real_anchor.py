"""lm-evaluation-harness on the real-anchor composition (SmolLM2-135M-Instruct composed with m_A): two
local harness tasks run by `calm eval --tasks` on 2 Ray Train workers (ZeRO-3), for SmolLM2 alone
(`--anchor-only`) and for the composition. Prints one JSON object.

- `world_heldout`: generate_until, the questions about people the composition never saw in training
  (the experiment's held-out eval file), exact match of the answer word;
- `general_mc`: multiple choice on common knowledge (no fictional names; `acc` and `acc_norm`), the
  anchor's own ability, which the composition should keep.

    .venv/bin/python bench/harness_real_anchor.py runs/real-anchor/runs/composition-seed-0/composition \\
        runs/real-anchor/seed-0/data/eval_heldout_people.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.eval.harness import local_task  # noqa: E402

GENERAL = [
    ("The capital of France is", [" Paris", " Berlin", " Rome", " Madrid"], 0),
    ("The capital of Japan is", [" Seoul", " Tokyo", " Beijing", " Bangkok"], 1),
    ("Two plus two equals", [" three", " four", " five", " six"], 1),
    ("Ten minus three equals", [" seven", " six", " eight", " five"], 0),
    ("The sky on a clear day is", [" green", " blue", " red", " brown"], 1),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Fahrenheit"], 0),
    ("A cat says", [" meow", " moo", " quack", " neigh"], 0),
    ("The largest planet in the solar system is", [" Mars", " Venus", " Jupiter", " Mercury"], 2),
    ("The opposite of hot is", [" warm", " cold", " wet", " bright"], 1),
    ("A week has", [" five days", " seven days", " ten days", " twelve days"], 1),
    ("The chemical symbol for water is", [" CO2", " H2O", " NaCl", " O2"], 1),
    ("The Earth orbits the", [" Moon", " Sun", " Mars", " comet"], 1),
    ("Bees make", [" milk", " honey", " silk", " wool"], 1),
    ("The first month of the year is", [" March", " January", " June", " December"], 1),
    ("A triangle has", [" three sides", " four sides", " five sides", " six sides"], 0),
    ("The color of ripe bananas is", [" purple", " yellow", " blue", " black"], 1),
    ("Ice is frozen", [" water", " sand", " air", " oil"], 0),
    ("The author of Romeo and Juliet is", [" Charles Dickens", " William Shakespeare", " Jane Austen", " Mark Twain"], 1),
    ("A baby dog is called a", [" kitten", " puppy", " calf", " foal"], 1),
    ("The tallest animal in the world is the", [" elephant", " giraffe", " horse", " camel"], 1),
    ("Python is a programming", [" language", " snake", " editor", " computer"], 0),
    ("Plants make food from sunlight by", [" photosynthesis", " digestion", " respiration", " erosion"], 0),
    ("The number of legs a spider has is", [" six", " eight", " ten", " four"], 1),
    ("The boiling point of water at sea level is 100 degrees", [" Celsius", " Fahrenheit", " Kelvin"], 0),
]


def write_tasks(folder: Path, heldout: Path) -> list[Path]:
    questions = [json.loads(line) for line in heldout.read_text().splitlines() if line]
    world = [{"question": r["prompt"], "answer": r["completion"].strip()} for r in questions]
    general = [{"question": q, "choices": choices, "answer": answer} for q, choices, answer in GENERAL]
    return [
        local_task(folder, "world_heldout", world, 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
                  'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n", ".", ","]\n  max_gen_toks: 4\n'
                  '  do_sample: false\nfilter_list:\n  - name: strip\n    filter:\n      - function: regex\n'
                  '        regex_pattern: "(\\\\w+)"\n      - function: take_first\nmetric_list:\n'
                  '  - metric: exact_match\n'),
        local_task(folder, "general_mc", general, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                  'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
                  '  - metric: acc_norm\n'),
    ]


def scores(results: Path) -> dict[str, float]:
    """{task/metric: value} of a harness results file (the filter's name dropped)."""
    found = {}
    for task, metrics in json.loads(results.read_text())["results"].items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, float) and not metric.endswith("_stderr"):
                found[f"{task}/{metric}"] = round(value, 4)
    return found


def run(composition: Path, tasks: list[Path], output: Path, anchor_only: bool) -> dict[str, float]:
    command = [sys.executable, "-m", "launcher.cli", "eval", str(composition), "--tasks", *map(str, tasks),
               "--workers", "2", "--output-dir", str(output)]
    if anchor_only:
        command.append("--anchor-only")
    before = set(output.glob("harness/*/results_*.json"))
    subprocess.run(command, cwd=ROOT, check=True, stdout=sys.stderr, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    (newest,) = set(output.glob("harness/*/results_*.json")) - before
    return scores(newest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("composition", type=Path, help="the real-anchor experiment's composition folder")
    parser.add_argument("heldout", type=Path, help="its held-out questions (eval_heldout_people.jsonl)")
    parser.add_argument("--output-dir", type=Path, help="where calm eval writes (default: beside the composition)")
    args = parser.parse_args()
    output = args.output_dir or args.composition.parent / "eval"
    with tempfile.TemporaryDirectory(prefix="calm-harness-tasks-") as folder:
        tasks = write_tasks(Path(folder), args.heldout)
        result = {"anchor": run(args.composition, tasks, output, anchor_only=True),
                  "composition": run(args.composition, tasks, output, anchor_only=False),
                  "results_under": str(output / "harness")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
