"""What a model is trained to do at each predicted token (label at t+1 not -100, predicted from t).

- `next_token_loss`: the label's cross-entropy, for every row;
- `keep_anchor_loss`: the same in ordinary rows, but in rows marked keep_anchor the KL divergence from
  the anchor alone's next-token distribution to the model's, each kind of row averaged on its own.
  Self-distillation on hard labels (the anchor's own greedy text) pushes the model to be surer of the
  anchor's answers than the anchor is, and the composition learned them as templates ("The currency of
  X is the" -> the answer it was shown for another X); the KL's minimum is the anchor itself, where it
  is exactly zero and so is its gradient (up to the rounding of a softmax's sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[t+1] from position t; label -100 is ignored."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


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
