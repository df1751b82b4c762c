"""The composition's options: one dataclass read by `compose`, the training config, composition
checkpoints and the workers alike, so a new option is added here (and described in the config) only.

The connections themselves are not options: they are data (calm_dist.model.connections).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

# Options a composition checkpoint records: what the trained weights mean. dropout is training-only.
SAVED = ("num_heads", "recency_bias", "null_attention", "residual_scale", "hide_unknown_tokens", "dtype")


@dataclass(frozen=True)
class CompositionOptions:
    num_heads: int | None = None
    """Cross-attention heads; None: the anchor's attention head count."""
    dtype: torch.dtype = torch.float32
    """dtype of the composition parameters (the base models keep their own)."""
    recency_bias: bool = False
    """Learned per-head penalties on how far back an augmenting token is (ALiBi-like); not in the paper."""
    null_attention: bool = False
    """A zero key and value every query may attend to, so the cross-attention can add nothing; not in the
    paper."""
    residual_scale: bool = False
    """Scale each cross-attention output by the RMS of the anchor state it is added to, so that a step of
    the optimizer changes a real anchor's residual stream (RMS 10-30 in SmolLM2's upper layers) as much as
    a toy's (RMS near 1); not in the paper."""
    hide_unknown_tokens: bool = False
    """Augmenting tokens that are their tokenizer's unknown token (`<unk>`: text the augmenting model has no
    word for) or its bos token (the same in every row) are keys no query may attend to, so the
    cross-attention reads only the text the augmenting model knows; for augmenting models with a tokenizer
    of their own (calm_dist.model.alignment.uninformative_ids); not in the paper."""
    dropout: float = 0.0
    """Training only: drop this share of the augmenting states the cross-attention reads; not in the paper."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def resolved(self, anchor_heads: int) -> CompositionOptions:
        """These options with num_heads filled in from the anchor when not given."""
        return replace(self, num_heads=self.num_heads or anchor_heads)

    def to_manifest(self) -> dict:
        """What composition.json records (num_heads should be resolved first)."""
        saved = {k: v for k, v in asdict(self).items() if k in SAVED}
        saved["dtype"] = str(self.dtype).removeprefix("torch.")
        return saved

    @classmethod
    def from_manifest(cls, manifest: dict) -> CompositionOptions:
        # Compositions saved before an option existed do not have it: off.
        return cls(num_heads=manifest["num_heads"], dtype=getattr(torch, manifest["dtype"]),
                   recency_bias=manifest.get("recency_bias", False),
                   null_attention=manifest.get("null_attention", False),
                   residual_scale=manifest.get("residual_scale", False),
                   hide_unknown_tokens=manifest.get("hide_unknown_tokens", False))
