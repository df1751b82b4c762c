"""General ability, the thing fine-tuning forgets, measured on what the target task is not:

- English prose the project did not write: the docstrings of Python's standard library, read from the
  interpreter's own source files (present on every Python install), scored as mean token loss;
- general prompts the base model completes correctly ("The capital of France is" -> "Paris"), scored
  as exact match of the first word generated. The list was kept to prompts SmolLM2-135M-Instruct gets
  right, so the base model scores 100 % and a drop is forgetting.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

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


def prose_files() -> list[Path]:
    """The standard library source files the prose comes from (those this Python has)."""
    root = stdlib_folder()
    return [root / f"{name}.py" for name in PROSE_MODULES if (root / f"{name}.py").is_file()]


def docstrings(min_chars: int = 300) -> list[str]:
    """Long, prose-like docstrings (mostly letters and spaces: not tables or code), whitespace folded."""
    found = []
    for path in prose_files():
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
