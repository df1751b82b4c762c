"""One CALM connection: f_proj followed by multi-head cross-attention (queries from the anchor).

Parameters live in leaf modules that are always invoked through __call__, so ZeRO-3 can gather them
on use without any knowledge of this code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Residual streams of real LMs have large, model-specific scales; normalising both sides keeps the
    # attention logits sane whatever the two models are. No weight: the linear map after it has one.
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class KeyValueProjection(nn.Module):
    """f_proj (D_A -> D_B, with bias) followed by the key and value maps (D_B -> D_B each).

    The three maps are linear in a row, so for many tokens it is cheaper to multiply the weights once
    per call and apply one D_A -> 2*D_B map; for few tokens (decoding) the plain order is cheaper.
    Both give the same function; the choice only moves rounding.
    """

    def __init__(self, aug_dim: int, anchor_dim: int):
        super().__init__()
        self.proj_weight = nn.Parameter(torch.empty(anchor_dim, aug_dim))
        self.proj_bias = nn.Parameter(torch.empty(anchor_dim))
        self.kv_weight = nn.Parameter(torch.empty(2 * anchor_dim, anchor_dim))  # keys then values
        for weight in (self.proj_weight, self.kv_weight):  # nn.Linear's initialisation
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        nn.init.uniform_(self.proj_bias, -1 / math.sqrt(aug_dim), 1 / math.sqrt(aug_dim))

    def folds_for(self, tokens: int) -> bool:
        anchor_dim, aug_dim = self.proj_weight.shape
        # Unfolded: tokens*(D_A*D_B + 2*D_B^2); folded: tokens*2*D_A*D_B + 2*D_B^2*D_A for the fold.
        return tokens * (2 * anchor_dim - aug_dim) > 2 * anchor_dim * aug_dim

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.folds_for(states.shape[:-1].numel()):
            keys_values = F.linear(states, self.kv_weight @ self.proj_weight, self.kv_weight @ self.proj_bias)
        else:
            keys_values = F.linear(F.linear(states, self.proj_weight, self.proj_bias), self.kv_weight)
        return keys_values.chunk(2, dim=-1)


def keys_after(allowed: torch.Tensor) -> torch.Tensor:
    """How many visible augmenting tokens come after each one: for a query, the token it may see last
    is at distance 0, the one before it at 1, and so on. Counting visible tokens rather than index
    differences leaves padding out and works unchanged when the two models tokenize differently.

    allowed: bool [..., len, aug_len] -> float of the same shape (meaningless where not allowed)."""
    visible = allowed.to(torch.float32)
    return visible.flip(-1).cumsum(-1).flip(-1) - visible


class RecencyBias(nn.Module):
    """A per-head learned penalty on how far back an augmenting token is (ALiBi's linear bias, with
    learned slopes).

    The paper's cross-attention has no notion of position, so "the augmenting state at this very
    token" can only be found from content. Where that is what the task needs (the key-value
    experiment: the value of the key just read), a head with a steep slope finds it at once."""

    def __init__(self, num_heads: int):
        super().__init__()
        # Every head starts out favouring the latest tokens (weight e^-1 per token back) and learns its
        # own slope. ALiBi's fixed geometric slopes (most heads nearly flat) trained worse on the
        # key-value experiment: its flat heads mixed every augmenting state into every position.
        self.slope = nn.Parameter(torch.ones(num_heads))

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return distance * -self.slope.view(-1, 1, 1)


class CrossAttention(nn.Module):
    """f_cross of the paper. Two options the paper does not have, both off unless asked for:
    recency_bias (RecencyBias) and null_attention, a key that every query sees, with value zero, so that
    a query that finds nothing useful can attend to it and add nothing (PyTorch's add_zero_attn). The
    paper's softmax must always spend all of its weight on augmenting states; where the augmenting model
    has nothing to say (the anchor's own skill), whatever it reads there is added to the anchor."""

    def __init__(self, aug_dim: int, anchor_dim: int, num_heads: int, eps: float = 1e-6,
                 recency_bias: bool = False, null_attention: bool = False, dropout: float = 0.0,
                 residual_scale: bool = False):
        super().__init__()
        if anchor_dim % num_heads:
            raise ValueError(f"anchor width {anchor_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.eps = eps
        self.key_value = KeyValueProjection(aug_dim, anchor_dim)
        self.q = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.out = nn.Linear(anchor_dim, anchor_dim, bias=False)
        # Zero output: the untrained composition adds exactly 0, so it equals the anchor.
        nn.init.zeros_(self.out.weight)
        self.recency = RecencyBias(num_heads) if recency_bias else None
        self.null_attention = null_attention
        self.dropout = dropout  # on the augmenting states, in training mode only
        # Output in units of the anchor state's RMS (a constant to the optimizer: no gradient through it).
        self.residual_scale = residual_scale

    @staticmethod
    def parameter_count(aug_dim: int, anchor_dim: int, num_heads: int = 0, recency_bias: bool = False) -> int:
        """The paper's D_A*D_B + 4*D_B^2, plus f_proj's bias (and one slope per head with the recency
        bias; the null key has no parameters)."""
        return aug_dim * anchor_dim + anchor_dim + 4 * anchor_dim * anchor_dim + (num_heads if recency_bias else 0)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def keys_values(self, aug_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values [batch, heads, aug_len, head_dim] of augmenting hidden states."""
        states = F.dropout(aug_states.to(self.q.weight.dtype), self.dropout, self.training)
        states = _rms(states, self.eps)
        keys, values = self.key_value(states)
        return self._split_heads(keys), self._split_heads(values)

    def forward(
        self,
        anchor_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor | None,
    ) -> torch.Tensor:
        """Cross-attention output [batch, len, anchor_dim], in the composition dtype.

        allowed: bool [batch, 1, len, aug_len], True where a query may see a key; None means plain
        causal attention over equally long sequences (the fast kernel). A query that may see no key at
        all (a left-padding position) gets output 0 rather than the NaN of an empty softmax.
        """
        if keys.shape[2] == 0:  # cross-tokenizer decoding before any augmenting token is settled
            return anchor_states.new_zeros(anchor_states.shape, dtype=self.q.weight.dtype)
        query = self._split_heads(self.q(_rms(anchor_states.to(self.q.weight.dtype), self.eps)))
        if self.recency is not None or self.null_attention:
            attended = self._attend_with_bias(query, keys, values, allowed)
        elif allowed is None:
            attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True)
        else:
            has_key = allowed.any(dim=-1, keepdim=True)
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed | ~has_key)
            attended = attended * has_key
        out = self._out(attended)
        if self.residual_scale:
            scale = anchor_states.detach().to(out.dtype).pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()
            out = out * scale
        return out

    def _attend_with_bias(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          allowed: torch.Tensor | None) -> torch.Tensor:
        """Attention with an additive mask: the recency bias, and/or the null key in front."""
        if allowed is None:  # plain causal over equally long sequences
            length = query.shape[2]
            allowed = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()[None, None]
        has_key = allowed.any(dim=-1, keepdim=True)
        if self.recency is not None:
            bias = self.recency(keys_after(allowed)).to(query.dtype)
        else:
            bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        bias = bias.masked_fill(~allowed, float("-inf"))
        if not self.null_attention:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias.masked_fill(~has_key, 0.0)) * has_key
        batch, heads, length, head_dim = query.shape
        bias = bias.expand(max(batch, bias.shape[0]), heads, length, -1)
        # The null key: logit 0 (q . 0), no distance, value 0. It makes every softmax non-empty too.
        bias = torch.cat([bias.new_zeros(*bias.shape[:3], 1), bias], dim=-1)
        keys = torch.cat([keys.new_zeros(keys.shape[0], heads, 1, head_dim), keys], dim=2)
        values = torch.cat([values.new_zeros(values.shape[0], heads, 1, head_dim), values], dim=2)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias)

    def _out(self, attended: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = attended.shape
        return self.out(attended.transpose(1, 2).reshape(batch, length, -1))
