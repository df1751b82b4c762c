"""m_A, the specialist: a small Llama trained here from scratch on the world's statements, with its own
word-level tokenizer. It completes statements ("Orvel Tannig lives in" -> " Wren") and has never seen a
question. Trained by the plain single-process loop the key-value experiment's base models use."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.real_anchor.world import ATTRIBUTES, World


@dataclass(frozen=True)
class SpecialistPlan:
    # One layer keeps each person's facts in their surname's embedding, linearly readable there (the
    # composition reads it: connections from augmenting layer -1); 2000 people recalled 100 % in 2000 steps.
    layers: int = 1
    width: int = 128
    heads: int = 4
    steps: int = 2000
    lr: float = 3e-3
    batch_size: int = 32


def new_model(plan: SpecialistPlan, tokenizer, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         num_hidden_layers=plan.layers, hidden_size=plan.width, num_attention_heads=plan.heads,
                         num_key_value_heads=plan.heads, intermediate_size=2 * plan.width, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def train_specialist(plan: SpecialistPlan, records: list[dict], tokenizer, seed: int) -> tuple[object, dict]:
    """m_A trained on `records` ({"text": statement}); returns it in eval mode and {final_loss, seconds}."""
    import datasets
    from tqdm import tqdm

    from calm_dist.data.tokenization import tokenize_records
    from launcher.kv_arithmetic import pretraining as local_training

    rows = list(tokenize_records(datasets.Dataset.from_list(records), tokenizer, max_length=128, text_field="text"))
    model = new_model(plan, tokenizer, seed)
    start = time.perf_counter()
    with tqdm(total=plan.steps, desc="training m_A", unit="step", leave=False, dynamic_ncols=True, disable=None,
              file=sys.stdout) as bar:  # stdout: quiet mode sends stderr to the log
        loss = local_training.train(local_training.lm_loss(model), model.parameters(),
                                    local_training.batches(rows, plan.batch_size, seed, tokenizer.pad_token_id),
                                    plan.steps, lr=plan.lr, warmup_steps=plan.steps // 20,
                                    on_step=lambda step, value: bar.update(1))
    return model.eval(), {"final_loss": round(loss, 4), "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def recall(model, tokenizer, world: World, people: int = 300) -> dict[str, float]:
    """Per attribute, the share of people whose attribute m_A predicts after its own statement prefix
    ("NAME lives in" -> town): what it knows, read its own way."""
    prefixes = {"town": "{name} lives in", "trade": "{name} works as a", "animal": "{name} keeps a"}
    sample = world.people[:: max(1, len(world.people) // people)][:people]
    scores = {}
    for attribute, prefix in prefixes.items():
        values = tokenizer.convert_tokens_to_ids(list(ATTRIBUTES[attribute]))
        encoded = tokenizer([prefix.format(name=p.name) for p in sample], return_tensors="pt", padding=True)
        # Same length for every prefix of one form (word level, one token per surname): no padding to mind.
        logits = model(input_ids=encoded.input_ids).logits[:, -1, values]
        guessed = [ATTRIBUTES[attribute][i] for i in logits.argmax(-1).tolist()]
        scores[attribute] = sum(g == getattr(p, attribute) for g, p in zip(guessed, sample, strict=True)) / len(sample)
    return scores


def save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
