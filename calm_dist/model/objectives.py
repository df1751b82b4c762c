"""What a model is trained to do at each predicted token (label at t+1 not -100, predicted from t).

- `next_token_loss`: the label's cross-entropy, for every row;
- `keep_anchor_loss`: the same in ordinary rows, but in rows marked keep_anchor the KL divergence from
  the anchor alone's next-token distribution to the model's, each kind of row averaged on its own.
  Self-distillation on hard labels (the anchor's own greedy text) pushes the model to be surer of the
  anchor's answers than the anchor is, and the composition learned them as templates ("The currency of
  X is the" -> the answer it was shown for another X); the KL's minimum is the anchor itself, where it
  is exactly zero and so is its gradient (up to the rounding of a softmax's sum).

Both are computed in chunks of positions where the logits are many (chunked_mean).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Above this many logits a loss is computed in chunks of this many (256 MB a chunk's fp32 array), each
# chunk's fp32 intermediates (the copy, the log-softmax, the KL's terms) recomputed in the backward pass
# instead of kept: whole, each is several times the logits' size (8 GB for 16k positions of a 128k
# vocabulary, four or five of them). Below it (SmolLM2's 16 x 40 tokens: 31M), the loss is the one
# expression it always was, to the bit. calm_dist.distributed.memory_plan plans with the same size.
CHUNK_LOGITS = 1 << 26


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[t+1] from position t; label -100 is ignored."""
    if logits[:, :-1].numel() > CHUNK_LOGITS:
        rows, steps = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        return chunked_mean(_cross_entropy_sum, logits, rows, steps, labels[rows, steps + 1])
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def chunked_mean(term: Callable[..., torch.Tensor], logits: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor,
                 *aligned: torch.Tensor) -> torch.Tensor:
    """The mean over positions i of a per-position term: term(logits[rows, steps] [n, V], *(a [n, ...]
    for a in aligned)) is the sum of its n positions' values. Taken CHUNK_LOGITS logits at a time, each
    chunk checkpointed (torch.utils.checkpoint), its gather inside: the backward pass keeps of a chunk
    only its indices, and the fp32 intermediates exist for one chunk at a time."""
    def gathered(logits: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor, *aligned: torch.Tensor) -> torch.Tensor:
        return term(logits[rows, steps], *aligned)

    per = max(1, CHUNK_LOGITS // logits.shape[-1])
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, len(rows), per):
        chunk = slice(start, start + per)
        # Nothing random inside: no RNG state to save and restore around each chunk (on CUDA, a copy each).
        total = total + checkpoint(gathered, logits, rows[chunk], steps[chunk], *(a[chunk] for a in aligned),
                                   use_reentrant=False, preserve_rng_state=False)
    return total / len(rows)


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _kl_sum(logits: torch.Tensor, anchor_logits: torch.Tensor) -> torch.Tensor:
    """Sum over the positions of KL(anchor || model), each the anchor's own softmax against the model's."""
    return F.kl_div(logits.float().log_softmax(-1), anchor_logits.float().log_softmax(-1), log_target=True,
                    reduction="sum")


def keep_anchor_loss(logits: torch.Tensor, labels: torch.Tensor, keep_anchor: torch.Tensor,
                     anchor_logits: torch.Tensor, anchor_weight: float = 1.0) -> torch.Tensor:
    """The mean cross-entropy to the label over the predicted tokens of rows where keep_anchor [B] is
    False, plus anchor_weight times the mean KL(anchor || model) over those of rows where it is True (a
    term is absent when the batch has no such tokens).

    Two means, not one over all tokens: ordinary text has tens of predicted tokens a row and an answer
    one or two, so in one mean the task would weigh as little as its share of the tokens (6 % of D_C's
    in the real-anchor experiment), and how much the task is learned would depend on how much prose
    keeps the anchor. anchor_logits: the anchor alone's logits for the kept rows only, [kept rows, L, V],
    in row order.
    """
    keep_anchor = keep_anchor.to(device=logits.device, dtype=torch.bool)
    targets = labels[:, 1:]
    predicted = targets != IGNORE_INDEX
    if logits[:, :-1].numel() > CHUNK_LOGITS:
        return _chunked_keep_anchor_loss(logits, targets, keep_anchor, anchor_logits, anchor_weight)
    total = logits.new_zeros((), dtype=torch.float32)
    task = ~keep_anchor
    if predicted[task].any():
        total = total + F.cross_entropy(logits[task, :-1].flatten(0, 1).float(), targets[task].flatten(),
                                        ignore_index=IGNORE_INDEX)
    if predicted[keep_anchor].any():
        model_log_p = logits[keep_anchor, :-1].float().log_softmax(-1)
        anchor_log_p = anchor_logits[:, :-1].to(model_log_p.device).float().log_softmax(-1)
        divergence = F.kl_div(model_log_p, anchor_log_p, log_target=True, reduction="none").sum(-1)
        total = total + anchor_weight * divergence[predicted[keep_anchor]].mean()
    return total


def _chunked_keep_anchor_loss(logits: torch.Tensor, targets: torch.Tensor, keep_anchor: torch.Tensor,
                              anchor_logits: torch.Tensor, anchor_weight: float) -> torch.Tensor:
    """keep_anchor_loss's two means by chunked_mean, over the predicted positions only."""
    predicted = targets != IGNORE_INDEX
    rows, steps = (predicted & ~keep_anchor[:, None]).nonzero(as_tuple=True)
    total = logits.new_zeros((), dtype=torch.float32)
    if len(rows):
        total = total + chunked_mean(_cross_entropy_sum, logits, rows, steps, targets[rows, steps])
    rows, steps = (predicted & keep_anchor[:, None]).nonzero(as_tuple=True)
    if len(rows):
        # anchor_logits holds the kept rows alone, in order: batch row r is its kept-row number. Gathered
        # chunk by chunk inside the checkpoint, as the model's logits are.
        anchor_logits = anchor_logits.to(logits.device)

        def divergence(picked: torch.Tensor, anchor_rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            return _kl_sum(picked, anchor_logits[anchor_rows, steps])

        kept_row = keep_anchor.cumsum(0) - 1
        total = total + anchor_weight * chunked_mean(divergence, logits, rows, steps, kept_row[rows], steps)
    return total
