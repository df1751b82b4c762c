"""The anchor alone's logits for some rows of a composed forward, computed only above the lowest connection.

Below the lowest anchor layer a connection writes into, the composed model and the anchor alone are the
same computation, so the composed forward already holds the anchor's own residual stream there. The
anchor is then run once more on the kept rows with its layers up to that one stood in for (the ones
below pass the residual through, that layer gives back what the composed forward computed), so only
the layers above, the final norm and the head run again: the anchor's own forward code does the rest
(embeddings, position embeddings, masks, any logit scaling), whatever the family. For the real-anchor
experiment (connections into layers 23 and 29 of SmolLM2's 30) that is 6 layers instead of 30.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from calm_dist.model.architectures import decoder_layers


class _Passed(nn.Module):
    """A layer below the fork: its output would be the stood-in layer's input anyway, and is not used."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class _Replayed(nn.Module):
    """The fork layer: gives back its output from the composed forward (before any cross-attention)."""

    def __init__(self, held: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.held, self.as_tuple = held, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (self.held,) if self.as_tuple else self.held


class AnchorAlone:
    """For one composed forward: `capturing(rows)` around it keeps the fork layer's own output for the
    selected rows, then `logits(...)` runs the anchor alone on those rows from there. fork: the lowest
    anchor layer a connection writes into; -1 (a connection into the input embeddings): nothing is
    shared, and logits() runs the whole anchor."""

    def __init__(self, anchor: nn.Module, fork: int):
        self.anchor, self.fork = anchor, fork
        self._held: tuple[torch.Tensor, bool] | None = None

    @contextlib.contextmanager
    def capturing(self, rows: torch.Tensor) -> Iterator[None]:
        """rows: bool [B]. The hook runs before the composition's own on that layer (prepend), so it
        sees the anchor's output; it is removed after the block, before any backward re-runs the layer."""

        def keep(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self._held = (hidden.detach()[rows.to(hidden.device)], isinstance(output, tuple))

        if self.fork < 0:
            yield
            return
        handle = decoder_layers(self.anchor)[self.fork].register_forward_hook(keep, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The anchor's logits for the captured rows (input_ids etc.: those rows only; position_ids as
        the composed forward had them, None if it let the anchor make them)."""
        if self.fork < 0:
            return self.anchor(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).logits
        assert self._held is not None, "logits() needs a composed forward under capturing() first"
        held, as_tuple = self._held
        self._held = None
        layers = decoder_layers(self.anchor)
        below = [layers[i] for i in range(self.fork + 1)]
        for i in range(self.fork):
            layers[i] = _Passed(as_tuple)
        layers[self.fork] = _Replayed(held, as_tuple)
        try:
            return self.anchor(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).logits
        finally:
            for i, layer in enumerate(below):
                layers[i] = layer
