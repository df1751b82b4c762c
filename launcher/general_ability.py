"""General ability, what fine-tuning forgets and a composition must keep, measured on what the target
task is not (LM-Cocktail's and the real-anchor CALM experiment's general columns):

- English prose the project did not write: the docstrings of Python's standard library, read from the
  interpreter's own source files (present on every Python install), scored as mean token loss;
- general prompts the base model completes correctly ("The capital of France is" -> "Paris"), scored
  as exact match of the first word generated. The list was drawn up as prompts SmolLM2-135M-Instruct
  gets right, but through the decoding loop every score here uses it answers 72.9 % of them (measured
  2026-12-06): a model is compared with the anchor's own score, not with 100 %. The second set
  (MORE_GENERAL_PROMPTS) was not drawn up by what SmolLM2 answers: it answers 35 of its 118, 70 of all
  166 (bench/general_prompt_margins.py, 2026-12-08).
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

# A second set of the same kinds, in about the same mix, for the real-anchor experiment, whose target is
# the anchor's exact match within 2 points: of 48 prompts one is 2.08 points, so that target could not
# tell one flipped near-tie (SmolLM2 prefers " kitten" to " cat" by 0.077 nats) from a composition that
# forgets; with 166 it allows 3. Written for that purpose (2026-12-08), before any composition was scored
# on them; LM-Cocktail's general column keeps the first 48.
MORE_GENERAL_PROMPTS = tuple((f"The capital of {country} is", city) for country, city in (
    ("Qatar", "Doha"), ("Uganda", "Kampala"), ("Senegal", "Dakar"), ("Zimbabwe", "Harare"), ("Afghanistan", "Kabul"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Albania", "Tirana"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"),
    ("Uzbekistan", "Tashkent"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"), ("Jamaica", "Kingston"),
    ("Sudan", "Khartoum"), ("Somalia", "Mogadishu"), ("Zambia", "Lusaka"), ("Angola", "Luanda"), ("Taiwan", "Taipei"),
    ("Malta", "Valletta"), ("Cyprus", "Nicosia"), ("Belarus", "Minsk"), ("Saudi Arabia", "Riyadh"), ("Oman", "Muscat"),
    ("Rwanda", "Kigali"), ("Mali", "Bamako"), ("Mozambique", "Maputo"), ("Namibia", "Windhoek"),
    ("Nicaragua", "Managua"), ("Azerbaijan", "Baku"), ("Laos", "Vientiane"), ("Liechtenstein", "Vaduz"),
    ("the United States", "Washington"),
)) + tuple((f"The opposite of {word} is", opposite) for word, opposite in (
    ("good", "bad"), ("love", "hate"), ("day", "night"), ("yes", "no"), ("east", "west"), ("boy", "girl"),
    ("in", "out"), ("on", "off"), ("always", "never"), ("push", "pull"), ("war", "peace"), ("male", "female"),
    ("king", "queen"), ("brother", "sister"), ("white", "black"), ("buy", "sell"), ("before", "after"),
    ("summer", "winter"), ("friend", "enemy"),
)) + tuple((f"The chemical symbol for {element} is", symbol) for element, symbol in (
    ("mercury", "Hg"), ("sulfur", "S"), ("chlorine", "Cl"), ("neon", "Ne"), ("uranium", "U"), ("magnesium", "Mg"),
    ("platinum", "Pt"), ("fluorine", "F"),
)) + tuple((f"The plural of {noun} is", plural) for noun, plural in (
    ("die", "dice"), ("deer", "deer"), ("life", "lives"), ("half", "halves"), ("wife", "wives"), ("hero", "heroes"),
    ("potato", "potatoes"), ("crisis", "crises"),
)) + tuple((f"A baby {animal} is called a", young) for animal, young in (
    ("kangaroo", "joey"), ("deer", "fawn"), ("swan", "cygnet"), ("elephant", "calf"),
)) + (
    ("The largest country in the world is", "Russia"), ("The largest continent is", "Asia"),
    ("The smallest continent is", "Australia"), ("The fastest land animal is the", "cheetah"),
    ("The largest mammal is the", "blue"), ("The author of Harry Potter is J.K.", "Rowling"),
    ("The author of Pride and Prejudice is Jane", "Austen"), ("The founder of Microsoft is Bill", "Gates"),
    ("The sixteenth President of the United States was Abraham", "Lincoln"),
    ("The composer of The Magic Flute was Wolfgang Amadeus", "Mozart"),
    ("The discoverer of penicillin was Alexander", "Fleming"),
    ("The theory of evolution was proposed by Charles", "Darwin"),
    ("The laws of motion were formulated by Isaac", "Newton"), ("The Great Barrier Reef is in", "Australia"),
    ("The Leaning Tower of Pisa is in", "Italy"), ("The Kremlin is in", "Moscow"), ("The Acropolis is in", "Athens"),
    ("Machu Picchu is in", "Peru"), ("Stonehenge is in", "England"),
    ("The Golden Gate Bridge is in San", "Francisco"), ("The currency of China is the", "yuan"),
    ("The currency of Russia is the", "ruble"), ("The currency of Mexico is the", "peso"),
    ("The currency of South Africa is the", "rand"), ("The primary language spoken in Mexico is", "Spanish"),
    ("The primary language spoken in Argentina is", "Spanish"), ("The Red Planet is", "Mars"),
    ("The sixth planet from the sun is", "Saturn"), ("The third planet from the sun is", "Earth"),
    ("The hardest natural substance is", "diamond"), ("A day has twenty-four", "hours"),
    ("An hour has sixty", "minutes"), ("A minute has sixty", "seconds"), ("A hexagon has six", "sides"),
    ("The month after January is", "February"), ("The day after Monday is", "Tuesday"),
    ("The season after winter is", "spring"), ("Bees make", "honey"), ("A caterpillar turns into a", "butterfly"),
    ("The color of a lemon is", "yellow"), ("The color of a tomato is", "red"),
    ("World War II ended in", "1945"), ("The element with atomic number 1 is", "hydrogen"),
)
ALL_GENERAL_PROMPTS = GENERAL_PROMPTS + MORE_GENERAL_PROMPTS


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
def general_completions(model, tokenizer, prompts=GENERAL_PROMPTS, max_new_tokens: int = 4) -> list[str]:
    """Greedy completions of the general prompts. `model`: a composed model, or a plain one (wrapped in
    calm_dist's SingleModel), decoded by the same loop."""
    from calm_dist.model.decoding import SingleModel, complete

    runner = model if hasattr(model, "composition") else SingleModel(model)
    return complete(runner, tokenizer, [p for p, _ in prompts], max_new_tokens=max_new_tokens, batch_size=16)


def answered(completions: list[str], prompts=GENERAL_PROMPTS) -> list[bool]:
    """Whether each completion starts with its prompt's answer word."""
    return [first_word(c) == a.lower() for c, (_, a) in zip(completions, prompts, strict=True)]


def changed_answers(base: list[str], other: list[str], prompts=GENERAL_PROMPTS) -> list[dict]:
    """The prompts one model answers right and the other does not, with both completions; `lost`: the
    base model's was the right one."""
    return [{"prompt": p, "base": b, "other": o, "lost": b_right}
            for (p, _), b, o, b_right, o_right in zip(prompts, base, other, answered(base, prompts),
                                                     answered(other, prompts), strict=True)
            if b_right != o_right]


def general_scores(model, tokenizer, prompts=GENERAL_PROMPTS) -> dict:
    """{general_loss, general_exact_match, general_completions} of a plain or composed model (the
    completions, to compare two models' answers with changed_answers)."""
    completions = general_completions(model, tokenizer, prompts)
    right = answered(completions, prompts)
    return {"general_loss": prose_loss(model, prose_chunks(tokenizer)), "general_exact_match": sum(right) / len(right),
            "general_completions": completions}
