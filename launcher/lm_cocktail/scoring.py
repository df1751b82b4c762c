"""How each model is scored on the tasks: exact match of greedy completions (general ability: launcher.general_ability)."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.general_ability import GENERAL_PROMPTS, first_word
from launcher.lm_cocktail.tasks import Example


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int = 4, batch_size: int = 50) -> float:
    """The share of prompts whose greedy completion starts with the answer word."""
    hits = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        encoded = tokenizer([e.prompt for e in batch], return_tensors="pt", padding=True)
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
        hits += sum(first_word(text) == e.answer.strip().lower() for text, e in zip(texts, batch, strict=True))
    return hits / len(examples)


def general_prompts() -> list[Example]:
    return [Example(prompt, " " + answer) for prompt, answer in GENERAL_PROMPTS]

