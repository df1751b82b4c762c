"""The LM-Cocktail experiment's tasks, generated from a seed: short texts with a one-word label.

- `news` (the target task T): a news sentence, answer its topic (sports, business, science, world).
  SmolLM2 has never seen the label set, so it scores ~0 zero-shot; fine-tuning teaches it in minutes.
- `reviews` (the other fine-tune's task): a product review, answer its sentiment (positive, negative).
- `mixed` (the new task none of the models was tuned on): news and reviews in one stream, each asked
  in its own form, on texts neither fine-tune saw. A model tuned on one kind knows half of it; a
  blend of the fine-tunes may know both halves.

A seed draws which sentences go to fine-tuning, to the few examples for the weights and to the held-out
set (three disjoint sets of texts) and the order of fine-tuning. Plain Python: no torch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_PLACES = ("in Madrid", "in Tokyo", "in Chicago", "in Nairobi", "in Berlin", "in Lima", "in Sydney", "in Cairo",
           "on Monday", "last week", "this morning", "on Friday")

# label: (subjects, predicates); a text is subject + predicate + place
_NEWS = {
    "sports": (("The striker", "The home team", "The coach", "The goalkeeper", "The captain", "The sprinter",
                "The champion"),
               ("scored twice in the final minutes", "won the league title", "was injured during training",
                "signed a new three-year contract", "broke the national record", "lost the semifinal on penalties",
                "qualified for the Olympic games")),
    "business": (("The company", "The bank", "The retailer", "Shareholders", "The startup", "The carmaker",
                  "Investors"),
                 ("reported record quarterly profits", "cut two thousand jobs", "agreed to a merger worth billions",
                  "raised prices for the second time", "saw its shares fall sharply",
                  "opened stores in three new markets", "missed its revenue forecast")),
    "science": (("Researchers", "Astronomers", "The laboratory", "Biologists", "A team of physicists",
                 "The space agency", "Chemists"),
                ("discovered a new species of frog", "observed a distant exploding star",
                 "sequenced the genome of the virus", "launched a probe toward Jupiter",
                 "measured the mass of the particle", "found water ice on the moon",
                 "developed a faster battery material")),
    "world": (("The president", "The prime minister", "Protesters", "The United Nations", "Rebel forces",
               "The foreign minister", "Voters"),
              ("called for a ceasefire in the region", "signed a peace agreement", "gathered outside parliament",
               "imposed new sanctions", "elected a new government", "closed the border crossing",
               "announced early elections")),
}

_PRODUCTS = ("These headphones", "This blender", "The hotel room", "This phone case", "The delivery", "This jacket",
             "The restaurant", "This laptop", "The tent", "This coffee maker", "The rental car", "This novel")
_OPINIONS = {
    "positive": ("worked perfectly from day one", "exceeded every expectation I had", "was worth every penny",
                 "made me very happy", "is the best purchase I made this year", "arrived early and looks great",
                 "is comfortable and well made"),
    "negative": ("broke after two days", "was a complete waste of money", "arrived damaged and late",
                 "stopped working within a week", "smelled awful and looked cheap", "was much worse than described",
                 "made me regret buying it"),
}
_TAILS = ("", " and I would say so again", ", honestly", " according to my whole family", ", as my friend agreed",
          " this time")

NEWS_LABELS = tuple(_NEWS)
REVIEW_LABELS = tuple(_OPINIONS)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # with its leading space, as the model generates it

    def record(self) -> dict:
        """As LM_Cocktail's example files (and `calm merge`'s weights_from_examples) take it."""
        return {"input": self.prompt, "output": self.answer}


@dataclass(frozen=True)
class Splits:
    finetune: list[Example]
    examples: list[Example]  # the few the Cocktail's weights come from
    heldout: list[Example]   # scored; never in fine-tuning or in the examples


def news_texts() -> list[tuple[str, str]]:
    return [(f"{subject} {predicate} {place}.", label) for label, (subjects, predicates) in _NEWS.items()
            for subject in subjects for predicate in predicates for place in _PLACES]


def review_texts() -> list[tuple[str, str]]:
    return [(f"{product} {opinion}{tail}.", label) for label, opinions in _OPINIONS.items()
            for product in _PRODUCTS for opinion in opinions for tail in _TAILS]


def news_prompt(text: str) -> str:
    return f"News: {text}\nTopic:"


def review_prompt(text: str) -> str:
    return f"Review: {text}\nSentiment:"


def split(texts: list[tuple[str, str]], prompt: Callable[[str, str], str], seed: int, examples: int,
          heldout: int) -> Splits:
    """Disjoint sets of texts, drawn by the seed: the rest is for fine-tuning. prompt(text, label)."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    made = [Example(prompt(text, label), " " + label) for text, label in order]
    return Splits(finetune=made[examples + heldout:], examples=made[:examples], heldout=made[examples:examples + heldout])


@dataclass(frozen=True)
class Tasks:
    news: Splits
    reviews: Splits
    mixed: Splits  # no fine-tuning set: nothing is tuned on it


def make_tasks(seed: int, examples: int = 10, heldout: int = 200) -> Tasks:
    """The three tasks for a seed. `mixed` draws its texts from those the fine-tunes never see (the
    news and review held-out pools' far ends), half news, half reviews, so it is new in form and text."""
    news_all, reviews_all = news_texts(), review_texts()
    rng = random.Random(seed)
    rng.shuffle(news_all)
    rng.shuffle(reviews_all)
    half = (examples + heldout) // 2
    prompts = {label: news_prompt for label in NEWS_LABELS} | {label: review_prompt for label in REVIEW_LABELS}
    mixed_texts = news_all[:half] + reviews_all[:examples + heldout - half]
    news = split(news_all[half:], lambda text, label: news_prompt(text), seed + 1, examples, heldout)
    reviews = split(reviews_all[examples + heldout - half:], lambda text, label: review_prompt(text), seed + 2,
                    examples, heldout)
    mixed = split(mixed_texts, lambda text, label: prompts[label](text), seed + 3, examples, heldout)
    return Tasks(news=news, reviews=reviews, mixed=Splits([], mixed.examples, mixed.heldout))
