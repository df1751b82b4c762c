"""LM-Cocktail's loss of one candidate model on the examples, decoder or embedding.

The recipes are LM_Cocktail's own (FlagEmbedding, LM_Cocktail 0.0.4, `compute_weights`), with its
defaults, so the weights agree with it (pinned by tests/fixtures/lm_cocktail_reference.json):
- decoder: each example is tokenized as `input + ' ' + output` with the tokenizer's special tokens,
  EOS appended; the first len(tokenize(input)) tokens are masked, so the space, the output and EOS are
  scored. Batches of batch_size examples in file order; a batch's loss is the mean next-token
  cross-entropy over all its scored tokens; a model's loss is the mean over batches.
- embedding: each example is {"query", "pos": [...], "neg": [...]}; a batch holds batch_size queries
  and, per query, pos[0] then `negatives` of its own negatives drawn with random.sample from a
  generator seeded by `seed` (LM_Cocktail draws them unseeded); texts become their first token's
  ([CLS]) final hidden state, L2-normalised; each query is scored against every passage of its batch,
  scores / contrastive_temperature, cross-entropy towards its own positive, averaged over the batch,
  then over batches.
Departures, all outside the defaults' results: `pooling: mean` (masked mean pooling instead of CLS);
padding is masked by length (LM_Cocktail masks every token equal to the pad id, and fails on a
tokenizer without one); a tokenizer without EOS scores no EOS (LM_Cocktail fails); over max_length
the sequence loses its end, as in LM_Cocktail.

The weights are merge/cocktail/weights.py's, from these losses. Models are loaded one at a time, under
no_grad. With device_map: auto (plus max_memory and offload_folder) accelerate spreads a model over
GPUs, CPU memory and disk, so a 70B candidate needs no device that holds it whole.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import torch

from merge.cocktail.examples import embedding_batches
from merge.merge_config import ExamplesWeights
from merge.merge_errors import ExamplesError


def model_loss(path: Path, tokenizer_path: Path, examples: list, spec: ExamplesWeights) -> float:
    """One candidate's loss on the examples: load it (as the spec places it), score, free it."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    loader = AutoModelForCausalLM if spec.kind == "decoder" else AutoModel
    placement = {
        "device_map": spec.device_map,
        "max_memory": spec.max_memory,
        "offload_folder": str(spec.offload_folder) if spec.offload_folder else None,
    }
    model = loader.from_pretrained(path, dtype="auto", **{k: v for k, v in placement.items() if v is not None})
    model.eval()
    try:
        return score_model(model, tokenizer, examples, spec)
    finally:
        del model
        gc.collect()


def score_model(model, tokenizer, examples: list[tuple[str, str]], spec: ExamplesWeights) -> float:
    """One loaded candidate's loss on the examples, whoever loaded it (one process, or ZeRO-3 workers)."""
    with torch.no_grad():
        if spec.kind == "decoder":
            return decoder_loss(model, tokenizer, examples, spec.max_length, spec.batch_size)
        return embedding_loss(model, tokenizer, examples, spec)


def _input_device(model: torch.nn.Module) -> torch.device:
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def _pad(sequences: list[list[int]], device: torch.device, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows (`fill` after each sequence) and the attention mask of the real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), fill, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


IGNORE = -100


def encode_example(tokenizer, prompt: str, output: str, max_length: int) -> tuple[list[int], list[int]]:
    """LM_Cocktail's encoding: ids of `prompt + ' ' + output` plus EOS, and labels with the prompt's
    len(tokenize(prompt)) tokens masked; both cut to max_length."""
    ids = tokenizer.encode(prompt + " " + output)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    masked = len(tokenizer.encode(prompt))
    labels = [IGNORE] * masked + ids[masked:]
    return ids[:max_length], labels[:max_length]


def decoder_loss(model, tokenizer, examples: list[tuple[str, str]], max_length: int, batch_size: int) -> float:
    """Mean over batches of each batch's mean next-token cross-entropy over its scored tokens."""
    device = _input_device(model)
    encoded = [encode_example(tokenizer, p, o, max_length) for p, o in examples]
    batch_losses = []
    for first in range(0, len(encoded), batch_size):
        batch = encoded[first : first + batch_size]
        ids, mask = _pad([seq for seq, _ in batch], device)
        labels, _ = _pad([lab for _, lab in batch], device, fill=IGNORE)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        targets = labels[:, 1:]
        if not bool((targets != IGNORE).any()):
            raise ExamplesError(f"examples {first + 1}-{first + len(batch)}: no output token left to score within max_length")
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE)
        batch_losses.append(loss.item())
    return math.fsum(batch_losses) / len(batch_losses)


def _embed(model, tokenizer, texts: list[str], spec: ExamplesWeights) -> torch.Tensor:
    device = _input_device(model)
    sequences = [tokenizer(t, truncation=True, max_length=spec.max_length)["input_ids"] for t in texts]
    ids, mask = _pad(sequences, device)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    if spec.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embedding_loss(model, tokenizer, examples: list[tuple[str, str, list[str]]], spec: ExamplesWeights) -> float:
    """Mean over batches of the batch's InfoNCE: every query against every passage of its batch."""
    losses = []
    for queries, passages in embedding_batches(examples, spec):
        q = _embed(model, tokenizer, queries, spec)
        p = _embed(model, tokenizer, passages, spec)
        scores = q @ p.T / spec.contrastive_temperature
        target = torch.arange(len(queries), device=scores.device) * (len(passages) // len(queries))
        losses.append(torch.nn.functional.cross_entropy(scores, target).item())
    return math.fsum(losses) / len(losses)
