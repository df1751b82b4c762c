"""One CALM connection: f_proj followed by multi-head cross-attention (queries from the anchor).

All parameters live in leaf submodules that are always invoked through __call__, so ZeRO-3 can
gather them on use without any knowledge of this code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, aug_dim: int, anchor_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if anchor_dim % num_heads:
            raise ValueError(f"anchor width {anchor_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.proj = nn.Linear(aug_dim, anchor_dim)  # f_proj: D_A -> D_B
        # Residual streams of real LMs have large, model-specific scales; normalising both sides keeps
        # the attention logits sane whatever the two models are.
        self.kv_norm = nn.RMSNorm(anchor_dim, eps=eps)
        self.query_norm = nn.RMSNorm(anchor_dim, eps=eps)
        self.q = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.k = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.v = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.out = nn.Linear(anchor_dim, anchor_dim, bias=False)
        # Zero output: the untrained composition adds exactly 0, so it equals the anchor.
        nn.init.zeros_(self.out.weight)

    @staticmethod
    def parameter_count(aug_dim: int, anchor_dim: int) -> int:
        return aug_dim * anchor_dim + anchor_dim + 2 * anchor_dim + 4 * anchor_dim * anchor_dim

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def keys_values(self, aug_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values [batch, heads, aug_len, head_dim] of augmenting hidden states."""
        projected = self.kv_norm(self.proj(aug_states.to(self.proj.weight.dtype)))
        return self._split_heads(self.k(projected)), self._split_heads(self.v(projected))

    def forward(
        self, anchor_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """Cross-attention output [batch, len, anchor_dim], in the composition dtype.

        allowed: bool [batch, 1, len, aug_len], True where a query may see a key. A query that may see
        no key at all (a padding position) gets output 0 rather than the NaN of an empty softmax.
        """
        query = self._split_heads(self.q(self.query_norm(anchor_states.to(self.q.weight.dtype))))
        has_key = allowed.any(dim=-1, keepdim=True)
        attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed | ~has_key)
        attended = attended * has_key
        batch, _, length, _ = attended.shape
        return self.out(attended.transpose(1, 2).reshape(batch, length, -1))
