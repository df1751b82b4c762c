"""LM-Cocktail's weights from the candidates' losses on a few examples: w = softmax(-loss / T).

The losses are merge/cocktail/losses.py's (scored in one process, or partitioned over Ray workers:
merge.job.cocktail_weights chooses); models in weights_from_examples.fixed keep their weight and the
others share what is left, LM-Cocktail's second step. Plain Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from merge.io.checkpoint_folder import Checkpoint
from merge.merge_config import ExamplesWeights
from merge.merge_errors import ExamplesError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def softmax_weights(losses: list[float], temperature: float) -> list[float]:
    """softmax(-loss / T), in float64, shifted by the smallest loss so no exponent overflows."""
    low = min(losses)
    scores = [math.exp(-(loss - low) / temperature) for loss in losses]
    total = math.fsum(scores)
    return [s / total for s in scores]


def weights_from_losses(
    spec: ExamplesWeights, checkpoints: list[Checkpoint], loss_of: Callable[[Checkpoint], float], examples: int,
    log: Callable[[str], None],
) -> tuple[list[float], list[float | None]]:
    """Weights for every model (config order) and the losses behind them (None for fixed models); each
    loss is asked of `loss_of` in turn, and must be finite."""
    losses: list[float | None] = []
    for ckpt in checkpoints:
        if ckpt.name in spec.fixed:
            losses.append(None)
            continue
        loss = loss_of(ckpt)
        if not math.isfinite(loss):
            raise ExamplesError(f"model '{ckpt.name}': its loss on {spec.examples} is {loss}, so no weight can be derived")
        log(f"loss of {ckpt.name} on {examples} examples: {loss:.6f}")
        losses.append(loss)
    free = softmax_weights([loss for loss in losses if loss is not None], spec.temperature)
    share = 1.0 - math.fsum(spec.fixed.values())
    weights = [spec.fixed[c.name] if c.name in spec.fixed else share * free.pop(0) for c in checkpoints]
    return weights, losses


def tokenizer_folder(checkpoints: list[Checkpoint]) -> Callable[[Checkpoint], Path]:
    """Each model's own tokenizer, else the first input's that has one."""
    having = [c.path for c in checkpoints if any((c.path / f).exists() for f in TOKENIZER_FILES)]
    if not having:
        raise ExamplesError("weights_from_examples: no model folder has tokenizer files to encode the examples with")
    return lambda c: c.path if c.path in having else having[0]
