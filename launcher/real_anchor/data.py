"""The record sets of the real-anchor experiment, written as JSONL files calm train and calm eval read.

- D_C: every question about the D_C people (3 per person), plus ordinary records that keep the anchor's
  behaviour where m_A has nothing to say (launcher.real_anchor.ordinary): prose, and the anchor's own
  answers to short factual prompts, marked `keep_anchor` (with data.keep_anchor_field, trained to the
  anchor's own distribution at each of their tokens, not to their text); never what is scored.
- eval sets: questions about held-out people, and about D_C people (memorised or read, for contrast).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from launcher.real_anchor.ordinary import prose_passages
from launcher.real_anchor.world import World, questions

EVAL_SETS = {"heldout": "eval_heldout_people", "dc_people": "eval_dc_people"}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_data(world: World, folder: Path, eval_questions: int, prose: int, anchor_answers: list[dict]
               ) -> dict[str, Path]:
    """D_C (its questions, `prose` passages and the anchor's answers) and the eval sets under folder;
    {stem: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    passages = prose_passages(world.seed)
    if len(passages) < prose:
        raise ValueError(f"the standard library's docstrings give {len(passages)} prose passages, fewer than {prose}")
    # The ordinary records are marked keep_anchor: with data.keep_anchor_field (configs/real-anchor.yaml
    # says why), trained to the anchor alone's predictions, not to their text.
    dc = ([{**q, "keep_anchor": False} for q in questions(world, world.dc_people, None, 1)]
          + [{**r, "keep_anchor": True} for r in passages[:prose] + anchor_answers])
    random.Random(f"real-anchor-dc-{world.seed}").shuffle(dc)
    sets = {
        "composition_train": dc,
        EVAL_SETS["heldout"]: questions(world, world.heldout_people, eval_questions, 2),
        EVAL_SETS["dc_people"]: questions(world, world.dc_people, eval_questions, 3),
    }
    return {stem: write_jsonl(folder / f"{stem}.jsonl", records) for stem, records in sets.items()}
