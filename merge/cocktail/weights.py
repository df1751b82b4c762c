"""LM-Cocktail's weights from a few examples: each candidate's loss on them, w = softmax(-loss / T).

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

from merge.io.checkpoint_folder import Checkpoint
from merge.merge_config import ExamplesWeights, MergeConfig
from merge.merge_errors import ExamplesError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


Example = tuple[str, str] | tuple[str, str, list[str]]  # decoder: (input, output); embedding: (query, pos, negs)


def read_examples(path: Path, kind: str = "decoder", negatives: int = 0) -> list:
    """Decoder examples as (input, output); embedding examples as (query, positive, negatives)."""
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
        examples.append(_decoder_example(path, number, record) if kind == "decoder" else _embedding_example(path, number, record, negatives))
    if not examples:
        raise ExamplesError(f"{path}: no examples")
    return examples


def _decoder_example(path: Path, number: int, record: object) -> tuple[str, str]:
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("input", "output")):
        raise ExamplesError(f"{path}:{number}: each line needs string fields 'input' and 'output'")
    if not record["output"]:
        raise ExamplesError(f"{path}:{number}: 'output' is empty, so there is nothing to score")
    return record["input"], record["output"]


def _embedding_example(path: Path, number: int, record: object, negatives: int) -> tuple[str, str, list[str]]:
    def texts(key: str) -> list[str] | None:
        value = record.get(key) if isinstance(record, dict) else None
        return value if isinstance(value, list) and value and all(isinstance(t, str) for t in value) else None

    if not isinstance(record, dict) or not isinstance(record.get("query"), str) or texts("pos") is None or texts("neg") is None:
        raise ExamplesError(
            f"{path}:{number}: embedding examples need 'query' (a string), 'pos' and 'neg' (lists of strings)"
        )
    if len(record["neg"]) < negatives:
        raise ExamplesError(
            f"{path}:{number}: {len(record['neg'])} negatives, fewer than weights_from_examples.negatives ({negatives})"
        )
    return record["query"], record["pos"][0], record["neg"]


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
    examples = read_examples(spec.examples, spec.kind, spec.negatives)
    tokenizer_dir = _tokenizer_folder(checkpoints)
    scored = [c for c in checkpoints if c.name not in spec.fixed]
    if spec.workers > 1:  # each candidate partitioned over ZeRO-3 workers (merge/execution/partitioned_losses.py)
        from merge.execution.partitioned_losses import partitioned_losses

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


def embedding_batches(examples: list[tuple[str, str, list[str]]], spec: ExamplesWeights) -> list[tuple[list[str], list[str]]]:
    """(queries, passages) per batch: per query its positive then its seeded negatives. Drawn once, so
    every candidate model sees the same negatives."""
    rng = random.Random(spec.seed)
    batches = []
    for first in range(0, len(examples), spec.batch_size):
        queries, passages = [], []
        for query, positive, negatives in examples[first : first + spec.batch_size]:
            queries.append(query)
            passages += [positive, *rng.sample(negatives, spec.negatives)]
        batches.append((queries, passages))
    return batches


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
