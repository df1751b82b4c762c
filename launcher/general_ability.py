"""General ability, what fine-tuning forgets and a composition must keep, measured on what the target
task is not (LM-Cocktail's and the real-anchor CALM experiment's general columns):

- English prose the project did not write: the docstrings of Python's standard library, read from the
  interpreter's own source files (present on every Python install), scored as mean token loss;
- general prompts the base model completes correctly ("The capital of France is" -> "Paris"), scored
  as exact match of the first word generated. The list was drawn up as prompts SmolLM2-135M-Instruct
  gets right, but through the decoding loop every score here uses it answers 72.9 % of them (measured
  2026-12-06): a model is compared with the anchor's own score, not with 100 %.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

import torch

# Pure-Python standard library modules with long prose docstrings, in a fixed order.
PROSE_MODULES = ("argparse", "collections/__init__", "json/__init__", "logging/__init__", "subprocess", "textwrap",
                 "pathlib", "functools", "heapq", "bisect", "random", "statistics", "fractions", "shutil", "tempfile",
                 "csv", "difflib", "string", "calendar", "contextlib", "dataclasses", "enum", "typing", "zipfile",
                 "tarfile", "inspect", "pickle", "threading", "queue", "sched", "smtplib", "ftplib", "gettext",
                 "locale", "mailbox", "optparse", "pprint", "selectors", "socketserver", "trace", "uuid", "weakref")

GENERAL_PROMPTS = (
    ("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"), ("The capital of Italy is", "Rome"),
    ("The capital of Germany is", "Berlin"), ("The capital of Spain is", "Madrid"),
    ("The capital of England is", "London"), ("The capital of Russia is", "Moscow"),
    ("The capital of Canada is", "Ottawa"), ("The capital of China is", "Beijing"),
    ("The capital of Greece is", "Athens"), ("The capital of Portugal is", "Lisbon"),
    ("The capital of Kenya is", "Nairobi"), ("The largest planet in the solar system is", "Jupiter"),
    ("The opposite of hot is", "cold"), ("The opposite of up is", "down"), ("The opposite of night is", "day"),
    ("A baby cat is called a", "kitten"), ("The chemical symbol for gold is", "Au"),
    ("The Eiffel Tower is in", "Paris"), ("The author of Romeo and Juliet is William", "Shakespeare"),
    ("Ice is frozen", "water"), ("The tallest mountain in the world is Mount", "Everest"),
    ("The longest river in Africa is the", "Nile"), ("The currency of Japan is the", "yen"),
    ("The planet closest to the sun is", "Mercury"), ("The largest ocean on Earth is the", "Pacific"),
    ("The primary language spoken in Brazil is", "Portuguese"),
    ("The inventor of the telephone was Alexander Graham", "Bell"), ("The first man on the moon was Neil", "Armstrong"),
    ("The plural of mouse is", "mice"), ("The Statue of Liberty is in New", "York"), ("A triangle has three", "sides"),
    ("Photosynthesis happens in the leaves of", "plants"), ("The capital of Sweden is", "Stockholm"),
    ("The capital of Norway is", "Oslo"), ("The capital of Ireland is", "Dublin"), ("The capital of Austria is", "Vienna"),
    ("The capital of Mexico is", "Mexico"), ("The capital of Thailand is", "Bangkok"),
    ("The chemical symbol for iron is", "Fe"), ("The chemical symbol for sodium is", "Na"),
    ("The opposite of black is", "white"), ("The opposite of big is", "small"), ("The opposite of fast is", "slow"),
    ("The plural of foot is", "feet"), ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The theory of relativity was developed by Albert", "Einstein"),
    ("The currency of the United Kingdom is the", "pound"),
)


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def prose_files(modules: tuple[str, ...] = PROSE_MODULES) -> list[Path]:
    """The standard library source files the prose comes from (those this Python has)."""
    root = stdlib_folder()
    return [root / f"{name}.py" for name in modules if (root / f"{name}.py").is_file()]


def docstrings(min_chars: int = 300, modules: tuple[str, ...] = PROSE_MODULES) -> list[str]:
    """Long, prose-like docstrings (mostly letters and spaces: not tables or code), whitespace folded."""
    found = []
    for path in prose_files(modules):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            text = ast.get_docstring(node)
            if not text or len(text) < min_chars:
                continue
            text = re.sub(r"\s+", " ", text)
            if sum(c.isalpha() or c == " " for c in text) / len(text) > 0.85:
                found.append(text)
    return found


def first_word(generated: str) -> str:
    """The word a completion starts with, without punctuation, lower case."""
    words = generated.split()
    return words[0].strip(".,;:!?'\"()").lower() if words else ""


def prose_chunks(tokenizer, chunks: int = 24, length: int = 128) -> torch.Tensor:
    """`chunks` x `length` tokens of standard-library docstrings, in a fixed order."""
    ids = tokenizer("\n\n".join(docstrings())).input_ids
    if len(ids) < chunks * length:
        raise RuntimeError(f"the standard library's docstrings give {len(ids)} tokens, fewer than {chunks * length}")
    return torch.tensor(ids[: chunks * length]).view(chunks, length)


@torch.no_grad()
def prose_loss(model, chunks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean token loss over the chunks (every chunk has as many predicted tokens, so batch means average).
    `model`: a Hugging Face causal LM or a composed model (both take input_ids= and labels=)."""
    total = 0.0
    for batch in chunks.split(batch_size):
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(chunks)


@torch.no_grad()
def general_exact_match(model, tokenizer, max_new_tokens: int = 4) -> float:
    """Share of the general prompts whose greedy completion starts with the answer word. `model`: a
    composed model, or a plain one (wrapped in calm_dist's SingleModel), decoded by the same loop."""
    from calm_dist.model.decoding import SingleModel, complete

    runner = model if hasattr(model, "composition") else SingleModel(model)
    prompts = GENERAL_PROMPTS
    completions = complete(runner, tokenizer, [p for p, _ in prompts], max_new_tokens=max_new_tokens, batch_size=16)
    return sum(first_word(c) == a.lower() for c, (_, a) in zip(completions, prompts, strict=True)) / len(prompts)


def general_scores(model, tokenizer) -> dict[str, float]:
    """{general_loss, general_exact_match} of a plain or composed model."""
    return {"general_loss": prose_loss(model, prose_chunks(tokenizer)),
            "general_exact_match": general_exact_match(model, tokenizer)}
