"""A generated fictional world: what the specialist m_A knows and the real anchor (SmolLM2) cannot.

A few thousand invented people, each with a unique invented surname, a home town, a trade and an
animal they keep. m_A reads plain statements about all of them ("Orvel Tannig lives in Wren.");
D_C asks questions about 20 % of them ("In which town does Orvel Tannig live?" -> " Wren"), and the
composition is scored on the other 80 %.

Every answer (town, trade, animal) is one token of the anchor's tokenizer (tests/test_real_anchor.py
checks it against the asset's tokenizer), so a greedy completion of one token is the whole answer: exact
match needs no rule for where an answer stops. Towns are English words used as names, so the anchor can
write them, but which person lives where is nowhere but in m_A. Each attribute has 24 values, so a model
that guesses scores about 4 %.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

TOWNS = ("Willow", "Copper", "Falcon", "Harbor", "Maple", "Cedar", "Hollow", "Raven", "Heather", "Wren", "Oak",
         "Pine", "Brook", "Glen", "Moor", "Ford", "Crown", "Fern", "Moss", "Ivy", "Holly", "Dale", "Crest", "Haven")
TRADES = ("baker", "tailor", "farmer", "miner", "carpenter", "butcher", "fisher", "hunter", "sailor", "brewer", "cook",
          "painter", "singer", "teacher", "doctor", "lawyer", "clerk", "merchant", "soldier", "priest", "nurse",
          "builder", "gardener", "printer")
ANIMALS = ("goat", "cat", "dog", "horse", "cow", "pig", "sheep", "duck", "goose", "hen", "rabbit", "donkey", "parrot",
           "owl", "fox", "mule", "ox", "camel", "turtle", "frog", "snake", "hawk", "crow", "mouse")
ATTRIBUTES = {"town": TOWNS, "trade": TRADES, "animal": ANIMALS}

# What m_A reads: plain statements, each attribute in several phrasings, never a question.
STATEMENTS = (
    "{name} lives in {town}.",
    "{name} works as a {trade}.",
    "{name} keeps a {animal}.",
    "{name} is a {trade} who lives in {town}.",
    "{name} lives in {town} and keeps a {animal}.",
    "{name}, the {trade}, keeps a {animal}.",
)
# What D_C and the evaluation ask: one question form per attribute, prompt and completion.
QUESTIONS = {
    "town": "Question: In which town does {name} live?\nAnswer:",
    "trade": "Question: What is the trade of {name}?\nAnswer:",
    "animal": "Question: Which animal does {name} keep?\nAnswer:",
}

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th", "tr",
           "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "l", "n", "r", "s", "th", "nd", "rk", "sk", "m", "x")


@dataclass(frozen=True)
class Person:
    first: str
    surname: str  # unique in the world
    town: str
    trade: str
    animal: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.surname}"


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    dc_people: tuple[Person, ...]  # the ones D_C asks about
    heldout_people: tuple[Person, ...]  # never in D_C
    seed: int


def _word(rng: random.Random, syllables: int) -> str:
    """`Tannig`, `Orvel`: open syllables, then one closing sound."""
    return ("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)).capitalize()


def make_world(seed: int, people: int = 2000, first_names: int = 200, dc_fraction: float = 0.2,
               reserved: frozenset[str] = frozenset()) -> World:
    """`people` people: a unique invented surname each (2-3 syllables drawn from sounds, none equal to a
    first name or an answer word), a first name from a pool of invented ones, and attributes drawn
    uniformly and independently. The first `dc_fraction` of them are D_C's.

    No name is a word of `reserved`: drawn from sounds, names can be real ones ("Neil", "Mona"), and a
    prompt that holds one ("The first man on the moon was Neil") is no longer free of the world, which
    m_A reads there as one of its people."""
    rng = random.Random(f"real-anchor-world-{seed}")
    firsts = sorted({_word(rng, rng.randint(1, 2)) for _ in range(first_names * 2)} - reserved)[:first_names]
    taken = set(firsts) | {w.capitalize() for values in ATTRIBUTES.values() for w in values} | reserved
    surnames: list[str] = []
    while len(surnames) < people:
        word = _word(rng, rng.randint(2, 3))
        if word not in taken:
            taken.add(word)
            surnames.append(word)
    everyone = tuple(Person(rng.choice(firsts), surname, rng.choice(TOWNS), rng.choice(TRADES), rng.choice(ANIMALS))
                     for surname in surnames)
    cut = round(people * dc_fraction)
    return World(everyone, everyone[:cut], everyone[cut:], seed)


def statements(world: World, per_record: int = 8, passes: int = 4) -> list[dict]:
    """m_A's training text: every statement form about every person, `passes` times in seeded orders,
    `per_record` statements to a record (as the key-value experiment's streams hold several pairs: more
    facts per step, so m_A learns the world in a couple of minutes)."""
    rng = random.Random(f"real-anchor-statements-{world.seed}")
    every = [form.format(name=p.name, town=p.town, trade=p.trade, animal=p.animal)
             for p in world.people for form in STATEMENTS]
    records = []
    for _ in range(passes):
        rng.shuffle(every)
        records += [{"text": " ".join(every[i:i + per_record])} for i in range(0, len(every), per_record)]
    return records


def questions(world: World, people: tuple[Person, ...], count: int | None, seed: int) -> list[dict]:
    """Prompt/completion questions about `people`: every (person, attribute) pair when count is None,
    else `count` of them drawn without repetition. Completions are " Answer" (one anchor token)."""
    rng = random.Random(f"real-anchor-questions-{world.seed}-{seed}")
    pairs = [(p, attribute) for p in people for attribute in QUESTIONS]
    if count is not None:
        pairs = rng.sample(pairs, count)
    else:
        rng.shuffle(pairs)
    return [{"prompt": QUESTIONS[a].format(name=p.name), "completion": " " + getattr(p, a), "attribute": a}
            for p, a in pairs]


def specialist_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """m_A's own tokenizer: word level over the words of its statements (each surname one token; any
    other word is <unk>), punctuation split off. Not the anchor's: the composition is cross-tokenizer."""
    words: set[str] = set()
    for record in statements(world):
        words.update(re.findall(r"\w+|[^\w\s]", record["text"]))
    specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    vocab = {t: i for i, t in enumerate([*specials.values(), *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=128, clean_up_tokenization_spaces=False,
                                   **specials)
