"""D_C's ordinary part: what keeps the anchor's own behaviour where m_A has nothing to say.

Two kinds, neither ever scored (launcher.general_ability scores other prose and other prompts):
- prose: runs of words from the docstrings of standard-library modules other than those the prose loss
  reads, trained on every token (an empty prompt), so the composition learns to leave the anchor's
  predictions alone at every position of ordinary text, not only after a prompt;
- the anchor's own answers: short factual prompts, none of them a general-ability prompt, completed
  by the anchor itself (greedy): self-distillation, so the composition learns to keep whatever the
  anchor says to prompts of that kind, right or wrong.

Measured on seed 0 (2026-12-06, one process): with docstring prompt/continuation pairs only, the
composition's prose loss rose with the position (+1 % over the first 10 tokens, +15 % beyond the 80th)
and it answered "The capital of France is" with EOS, as it ends the world's answers; with these (400
steps), its prose loss was 2 % below the anchor's, and of the general prompts it answered 68.8 %
against the anchor's 72.9 % (held-out questions 61.7 %). Twice as many prompts (742) did not help
(64.6 %, held-out 59.7 %).
"""

from __future__ import annotations

import random
import re

from launcher.general_ability import ALL_GENERAL_PROMPTS, PROSE_MODULES, docstrings
from launcher.real_anchor.world import ANIMALS, TRADES

# Standard-library modules whose docstrings give D_C its prose; disjoint from PROSE_MODULES.
ORDINARY_MODULES = ("os", "glob", "fnmatch", "codecs", "ipaddress", "datetime", "email/message", "http/client",
                    "unittest/case", "urllib/parse", "configparser", "shlex", "timeit", "doctest", "pydoc",
                    "traceback", "warnings", "gzip", "hashlib", "copy", "io", "platform", "ast", "filecmp",
                    "mimetypes", "imaplib", "nntplib", "poplib", "getopt", "tokenize", "secrets", "base64",
                    "operator", "numbers", "abc", "sysconfig", "site", "runpy", "netrc", "plistlib", "wave")

_COUNTRIES = ("Poland", "Egypt", "India", "Peru", "Chile", "Argentina", "Australia", "Turkey", "Cuba", "Finland",
              "Denmark", "Netherlands", "Belgium", "Hungary", "Iran", "Iraq", "Vietnam", "Indonesia", "Nigeria",
              "Ghana", "Ethiopia", "Morocco", "Colombia", "Venezuela", "Switzerland", "Scotland", "Wales", "Iceland",
              "Romania", "Ukraine", "Pakistan", "Bangladesh", "Nepal", "Mongolia", "Korea", "Israel", "Syria",
              "Jordan", "Lebanon", "Czechia", "Croatia", "Serbia", "Bulgaria", "Philippines", "Malaysia",
              "Singapore", "Algeria", "Tunisia", "Libya")
_WORDS = ("cold", "down", "old", "happy", "light", "early", "open", "wet", "hard", "rich", "loud", "long", "strong",
          "empty", "high", "left", "north", "inside", "true", "young", "heavy", "dry", "clean", "near", "first")
_NOUNS = ("child", "tooth", "man", "woman", "goose", "leaf", "knife", "wolf", "person", "cactus", "box", "city")
_ELEMENTS = ("silver", "copper", "oxygen", "carbon", "hydrogen", "helium", "lead", "tin", "zinc", "potassium",
             "calcium", "nitrogen")
_COLOURED = ("grass", "the sky", "snow", "blood", "a banana", "coal", "an orange", "the sun", "milk", "chocolate")
_YOUNG = ("dog", "cow", "horse", "sheep", "goat", "duck", "bear", "lion", "frog", "pig")
_KINDS = _YOUNG + ("rose", "oak", "salmon", "eagle", "spider", "whale")
_OTHERS = (
    "Water boils at", "The Great Wall is in", "The Pyramids of Giza are in", "The Colosseum is in",
    "The Taj Mahal is in", "Big Ben is in", "The Amazon rainforest is in", "Mount Fuji is in", "A week has seven",
    "A year has twelve", "A square has four", "The sun rises in the", "The speed of light is", "Honey is made by",
    "The heart pumps", "Plants need sunlight and", "The first President of the United States was George",
    "The Beatles were a band from", "Bread is made from", "Cheese is made from", "The sum of two and two is",
    "Ten minus three is", "The largest desert in the world is the", "The smallest planet in the solar system is",
    "The freezing point of water is", "The human body has two", "A spider has eight", "The language spoken in France is",
    "The language spoken in Germany is", "The currency of the United States is the", "The currency of Europe is the",
    "The author of Hamlet is William", "The painter of Starry Night was Vincent van",
    "The inventor of the light bulb was Thomas", "The composer of the Fifth Symphony was Ludwig van",
)


def factual_prompts() -> list[str]:
    """Short prompts of the general prompts' kind (countries, opposites, plurals, symbols, ...), none of
    them a general-ability prompt, in a fixed order."""
    prompts = [f"The capital of {c} is" for c in _COUNTRIES]
    prompts += [f"The opposite of {w} is" for w in _WORDS]
    prompts += [f"The plural of {n} is" for n in _NOUNS]
    prompts += [f"The chemical symbol for {e} is" for e in _ELEMENTS]
    prompts += [f"The color of {t} is" for t in _COLOURED]
    prompts += [f"A baby {a} is called a" for a in _YOUNG]
    prompts += list(_OTHERS)
    prompts += [f"{c} is a country in" for c in _COUNTRIES]
    prompts += [f"The largest city in {c} is" for c in _COUNTRIES]
    prompts += [f"The official language of {c} is" for c in _COUNTRIES]
    prompts += [f"The currency of {c} is the" for c in _COUNTRIES]
    prompts += [f"The word {w} means" for w in _WORDS]
    prompts += [f"A {k} is a kind of" for k in _KINDS]
    taken = {p for p, _ in ALL_GENERAL_PROMPTS}
    assert not set(prompts) & taken, "what keeps the anchor must not be what is scored"
    taken |= set(prompts)
    return prompts + [p for p in _world_word_prompts() if p not in taken]


def _world_word_prompts() -> list[str]:
    """Ordinary prompts about the words the world shares with English: its animals and trades.

    m_A knows these words (a person "keeps a cat"), so the composition, trained to write a person's
    animal or trade, learned to write them wherever m_A reads one: every seed answered the general prompt
    "A baby cat is called a" with " cat" or " baby cat" (SmolLM2: " kitten"), though D_C kept the anchor's
    answers about seven other animals' young. Kept here for every animal and trade but the prompts
    scored (the cat's), so the composition learns to leave these words alone outside questions about people.
    With them (bench/real_anchor.py, 2026-12-06), seeds 0 and 1 answered every general prompt as SmolLM2
    does and seed 2 all but that one (" mongoose"); held-out 68.0, 68.0, 67.3 % (64.7, 74.0, 62.7 before).
    Seven frames an animal and four a trade (what it eats, where it lives; where a trade works: 643
    prompts, not 499) kept all 48 on every seed, but seed 1's held-out fell to 55.0 % (seeds 0 and 2:
    67.3 %; bench/real_anchor_variant.py, 2026-12-07): more ordinary records, fewer questions in 400 steps.
    With as many ordinary records as now (D_C's prose 480 -> 336 passages), seed 1's held-out rose to
    76.3 %, but it lost "The Eiffel Tower is in" (" the process of being"); with 408 passages, 63.0 % and
    the same loss. The prose keeps that answer. With seven and four and 450 steps instead of 400, seed 1's
    held-out was 67.0 % but it lost "The capital of Canada is" (" Toronto") and the Eiffel Tower: near-ties
    of SmolLM2's own (bench/general_prompt_margins.py, 2026-12-07). These frames stay as they are."""
    def a(word: str) -> str:
        return f"an {word}" if word[0] in "aeiou" else f"a {word}"

    prompts = [form for animal in ANIMALS for form in (f"A baby {animal} is called a", f"The plural of {animal} is",
                                                       f"{a(animal).capitalize()} is an animal that")]
    prompts += [form for trade in TRADES for form in (f"{a(trade).capitalize()} is a person who",
                                                      f"The work of {a(trade)} is to")]
    return prompts


def prose_passages(seed: int, words: int = 40) -> list[dict]:
    """Consecutive runs of `words` words of the docstrings, each a record of completion only."""
    assert not set(ORDINARY_MODULES) & set(PROSE_MODULES), "D_C's prose must not be what is scored"
    records = []
    for text in docstrings(modules=ORDINARY_MODULES):
        run = text.split()
        records += [{"prompt": "", "completion": " ".join(run[start:start + words])}
                    for start in range(0, len(run) - words + 1, words)]
    random.Random(f"real-anchor-prose-{seed}").shuffle(records)
    return records


def ordinary_words() -> frozenset[str]:
    """Every word of the text the anchor's own ability is scored on (general prompts and their answers,
    the prose loss's docstrings) or kept with (D_C's factual prompts and prose): what no invented name
    of the world may be (launcher.real_anchor.world.make_world)."""
    texts = [p + " " + a for p, a in ALL_GENERAL_PROMPTS] + factual_prompts()
    texts += docstrings(modules=PROSE_MODULES) + docstrings(modules=ORDINARY_MODULES)
    return frozenset(word for text in texts for word in re.findall(r"\w+", text))


def anchor_answers(model, tokenizer, max_new_tokens: int) -> list[dict]:
    """The factual prompts with the anchor's own greedy continuations, by the decoding loop `calm eval` uses."""
    from calm_dist.model.decoding import SingleModel, complete

    prompts = factual_prompts()
    completions = complete(SingleModel(model), tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=32)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
