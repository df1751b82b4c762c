"""The record sets of the real-anchor experiment, written as JSONL files calm train and calm eval read.

- D_C: every question about the D_C people (3 per person), plus ordinary text as prompt/completion
  pairs, so that the composition keeps the anchor's behaviour where m_A has nothing to say. The ordinary
  text is English prose of the Python standard library's docstrings, from modules other than those the
  general-ability score reads (launcher.general_ability.PROSE_MODULES): never scored on.
- eval sets: questions about held-out people, and about D_C people (memorised or read, for contrast).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from launcher.general_ability import PROSE_MODULES, docstrings
from launcher.real_anchor.world import World, questions

# Standard-library modules whose docstrings give D_C its ordinary text; disjoint from PROSE_MODULES.
ORDINARY_MODULES = ("os", "glob", "fnmatch", "codecs", "ipaddress", "datetime", "email/message", "http/client",
                    "unittest/case", "urllib/parse", "configparser", "shlex", "timeit", "doctest", "pydoc",
                    "traceback", "warnings", "gzip", "hashlib", "copy", "io", "platform", "ast", "filecmp",
                    "mimetypes", "imaplib", "nntplib", "poplib", "getopt", "tokenize", "secrets", "base64",
                    "operator", "numbers", "abc", "sysconfig", "site", "runpy", "netrc", "plistlib", "wave")
EVAL_SETS = {"heldout": "eval_heldout_people", "dc_people": "eval_dc_people"}


def ordinary_examples(seed: int, prompt_words: int = 12, completion_words: int = 8) -> list[dict]:
    """Consecutive word runs of the docstrings, each split into a prompt and its continuation."""
    assert not set(ORDINARY_MODULES) & set(PROSE_MODULES), "D_C's ordinary text must not be what is scored"
    span = prompt_words + completion_words
    records = []
    for text in docstrings(modules=ORDINARY_MODULES):
        words = text.split()
        for start in range(0, len(words) - span + 1, span):
            records.append({"prompt": " ".join(words[start:start + prompt_words]),
                            "completion": " " + " ".join(words[start + prompt_words:start + span])})
    random.Random(f"real-anchor-ordinary-{seed}").shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_data(world: World, folder: Path, eval_questions: int, ordinary: int) -> dict[str, Path]:
    """D_C and the eval sets under folder; {stem: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    dc = questions(world, world.dc_people, None, 1) + ordinary_examples(world.seed)[:ordinary]
    random.Random(f"real-anchor-dc-{world.seed}").shuffle(dc)
    sets = {
        "composition_train": dc,
        EVAL_SETS["heldout"]: questions(world, world.heldout_people, eval_questions, 2),
        EVAL_SETS["dc_people"]: questions(world, world.dc_people, eval_questions, 3),
    }
    return {stem: write_jsonl(folder / f"{stem}.jsonl", records) for stem, records in sets.items()}
