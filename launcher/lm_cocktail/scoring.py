"""How each model is scored: exact match of greedy completions, and mean token loss on prose."""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.lm_cocktail.general import GENERAL_PROMPTS, docstrings, first_word
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


def prose_chunks(tokenizer, chunks: int = 24, length: int = 128) -> torch.Tensor:
    """`chunks` x `length` tokens of standard-library docstrings, in a fixed order."""
    ids = tokenizer("\n\n".join(docstrings())).input_ids
    if len(ids) < chunks * length:
        raise RuntimeError(f"the standard library's docstrings give {len(ids)} tokens, fewer than {chunks * length}")
    return torch.tensor(ids[: chunks * length]).view(chunks, length)


@torch.no_grad()
def prose_loss(model, chunks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean token loss over the chunks (every chunk has as many predicted tokens, so batch means average)."""
    total = 0.0
    for batch in chunks.split(batch_size):
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(chunks)
