"""LM-Cocktail's weights from a few examples: each candidate's mean loss on them, w = softmax(-loss / T).

Decoder models: per example, the mean next-token cross-entropy over the output's tokens, the prompt's
tokens masked; a model's loss is the mean over examples. Examples are batched with right padding and
an attention mask, padded with token 0 whatever the tokenizer's pad token (many decoders have none).
Embedding models: InfoNCE. Each input is a query, its output the positive, and `negatives` outputs
of other examples (drawn with a seeded generator, so weights are the same on every run) the negatives;
texts become vectors by masked mean pooling or the first ([CLS]) token, L2-normalised; scores are
cosine / contrastive_temperature.

Models are loaded one at a time, under no_grad. With device_map: auto (plus max_memory and
offload_folder) accelerate spreads a model over GPUs, CPU memory and disk, so a 70B candidate needs
no device that holds it whole.
"""

from __future__ import annotations

import gc
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch

from merge.checkpoint import Checkpoint
from merge.config import ExamplesWeights, MergeConfig
from merge.errors import ExamplesError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def read_examples(path: Path) -> list[tuple[str, str]]:
    examples = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ExamplesError(f"{path}: cannot read: {err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ExamplesError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("input", "output")):
            raise ExamplesError(f"{path}:{number}: each line needs string fields 'input' and 'output'")
        if not record["output"]:
            raise ExamplesError(f"{path}:{number}: 'output' is empty, so there is nothing to score")
        examples.append((record["input"], record["output"]))
    if not examples:
        raise ExamplesError(f"{path}: no examples")
    return examples


def softmax_weights(losses: list[float], temperature: float) -> list[float]:
    """softmax(-loss / T), in float64, shifted by the smallest loss so no exponent overflows."""
    low = min(losses)
    scores = [math.exp(-(loss - low) / temperature) for loss in losses]
    total = math.fsum(scores)
    return [s / total for s in scores]


def cocktail_weights(
    cfg: MergeConfig, checkpoints: list[Checkpoint], log: Callable[[str], None], address: str | None = None
) -> tuple[list[float], list[float | None]]:
    """Weights for every model (config order) and the losses behind them (None for fixed models).
    With weights_from_examples.workers > 1 the losses come from Ray workers, on the cluster at
    `address` if given (else an embedded local one)."""
    spec = cfg.weights_from_examples
    assert spec is not None
    examples = read_examples(spec.examples)
    if spec.kind == "embedding" and len(examples) < 2:
        raise ExamplesError(f"{spec.examples}: embedding models need at least 2 examples (negatives come from the others)")
    tokenizer_dir = _tokenizer_folder(checkpoints)
    scored = [c for c in checkpoints if c.name not in spec.fixed]
    if spec.workers > 1:  # each candidate partitioned over ZeRO-3 workers (merge/partitioned_losses.py)
        from merge.partitioned_losses import partitioned_losses

        found = partitioned_losses([(c.path, tokenizer_dir(c)) for c in scored], examples, spec, address, log)
    losses: list[float | None] = []
    for ckpt in checkpoints:
        if ckpt.name in spec.fixed:
            losses.append(None)
            continue
        if spec.workers > 1:
            loss = found[scored.index(ckpt)]
        else:
            loss = model_loss(ckpt.path, tokenizer_dir(ckpt), examples, spec)
        if not math.isfinite(loss):
            raise ExamplesError(f"model '{ckpt.name}': its loss on {spec.examples} is {loss}, so no weight can be derived")
        log(f"loss of {ckpt.name} on {len(examples)} examples: {loss:.6f}")
        losses.append(loss)
    free = softmax_weights([loss for loss in losses if loss is not None], spec.temperature)
    share = 1.0 - math.fsum(spec.fixed.values())
    weights = [spec.fixed[c.name] if c.name in spec.fixed else share * free.pop(0) for c in checkpoints]
    return weights, losses


def _tokenizer_folder(checkpoints: list[Checkpoint]) -> Callable[[Checkpoint], Path]:
    """Each model's own tokenizer, else the first input's that has one."""
    having = [c.path for c in checkpoints if any((c.path / f).exists() for f in TOKENIZER_FILES)]
    if not having:
        raise ExamplesError("weights_from_examples: no model folder has tokenizer files to encode the examples with")
    return lambda c: c.path if c.path in having else having[0]


def model_loss(path: Path, tokenizer_path: Path, examples: list[tuple[str, str]], spec: ExamplesWeights) -> float:
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


def _pad(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad id 0: masked, so any id works) and the attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def encode_example(tokenizer, prompt: str, output: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + output and the prompt's length. The two are tokenized separately so the
    boundary is exact; over max_length, the prompt loses its start, then the output its end."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"][:max_length]
    room = max_length - len(output_ids)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - room) :] if room > 0 else []
    return prompt_ids + output_ids, len(prompt_ids)


def decoder_loss(model, tokenizer, examples: list[tuple[str, str]], max_length: int, batch_size: int) -> float:
    """Mean over examples of the mean next-token cross-entropy over each output's tokens."""
    device = _input_device(model)
    encoded = [encode_example(tokenizer, p, o, max_length) for p, o in examples]
    per_example = []
    for first in range(0, len(encoded), batch_size):
        batch = encoded[first : first + batch_size]
        ids, mask = _pad([seq for seq, _ in batch], device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        for row, (seq, prompt_len) in enumerate(batch):
            # Position j predicts token j+1; score the output's tokens that have something before them.
            scored = token_loss[row, max(prompt_len, 1) - 1 : len(seq) - 1]
            if scored.numel():
                per_example.append(scored.mean().item())
    if not per_example:
        raise ExamplesError("no example has an output token to score (a one-token output needs a prompt)")
    return math.fsum(per_example) / len(per_example)


def _embed(model, tokenizer, texts: list[str], spec: ExamplesWeights) -> torch.Tensor:
    device = _input_device(model)
    vectors = []
    for first in range(0, len(texts), spec.batch_size):
        sequences = [tokenizer(t)["input_ids"][: spec.max_length] for t in texts[first : first + spec.batch_size]]
        ids, mask = _pad(sequences, device)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
        vectors.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(vectors)


def embedding_loss(model, tokenizer, examples: list[tuple[str, str]], spec: ExamplesWeights) -> float:
    """Mean InfoNCE loss: each query against its positive and seeded negatives from other examples."""
    queries = _embed(model, tokenizer, [q for q, _ in examples], spec)
    passages = _embed(model, tokenizer, [p for _, p in examples], spec)
    rng = random.Random(spec.seed)
    losses = []
    for i in range(len(examples)):
        others = [j for j in range(len(examples)) if j != i]
        candidates = [i] + rng.sample(others, min(spec.negatives, len(others)))
        scores = passages[candidates] @ queries[i] / spec.contrastive_temperature
        losses.append(-torch.log_softmax(scores, dim=0)[0].item())
    return math.fsum(losses) / len(losses)
