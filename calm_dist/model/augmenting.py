"""The augmenting models' side of a composition: run each (frozen, without autograd) and keep the
hidden states of its connected layers, over the anchor's tokens or, for a model with a tokenizer of its
own, over its own settled tokens. Free functions, so augmenting models can run outside the composed
model: beside a ZeRO-sharded anchor (colocated) or on ranks of their own (pipelined)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from calm_dist.model.alignment import AugmentingView
from calm_dist.model.architectures import backbone, decoder_layers, model_dims
from calm_dist.model.connections import INPUT, Connection
from calm_dist.model.masks import positions_from_mask


@torch.no_grad()
def augmenting_states(
    models: Sequence[nn.Module],
    connections: Sequence[Connection],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    caches: Sequence[DynamicCache] | None = None,
    views: Sequence[AugmentingView | None] | None = None,
    past_masks: Mapping[int, torch.Tensor] | None = None,
) -> dict[tuple[int, int], torch.Tensor]:
    """Hidden states of the connected layers of each augmenting model, without autograd.

    A free function so that augmenting models can run outside the composed model: on each worker
    beside a ZeRO-sharded anchor (colocated), or on ranks of their own (pipelined). views[k], when
    given, holds model k's own tokens (a tokenizer of its own) in place of input_ids; past_masks[k]
    then says which of its cached positions are real.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)[:, -input_ids.shape[1]:]
    states: dict[tuple[int, int], torch.Tensor] = {}
    for k, model in enumerate(models):
        wanted = sorted({c.aug_layer for c in connections if c.augmenting == k})
        if not wanted:
            continue
        view = views[k] if views is not None else None
        if view is not None:
            _own_states(states, model, wanted, k, view, past_masks.get(k) if past_masks else None,
                        caches[k] if caches is not None else None)
            continue
        _run_capturing(states, model, wanted, k, input_ids, attention_mask, position_ids,
                       caches[k] if caches is not None else None)
    return states


def _run_capturing(states: dict, model: nn.Module, wanted: list[int], k: int, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None) -> None:
    """Run augmenting model k's backbone, keeping the outputs of its `wanted` layers in states[(k, layer)]
    (layer INPUT: its token embeddings, as its first decoder layer reads them)."""
    layers = decoder_layers(model)
    handles = [layers[0].register_forward_pre_hook(_capture_input(states, (k, i)), with_kwargs=True) if i == INPUT
               else layers[i].register_forward_hook(_capture(states, (k, i))) for i in wanted]
    try:
        backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=cache is not None)
    finally:
        for handle in handles:
            handle.remove()


def _own_states(states: dict, model: nn.Module, wanted: list[int], k: int, view: AugmentingView,
                past_mask: torch.Tensor | None, cache: DynamicCache | None) -> None:
    """Connected states of augmenting model k over its own new tokens (possibly none this step)."""
    ids = view.input_ids
    if ids.shape[1] == 0:
        dims = model_dims(model)
        empty = torch.zeros(ids.shape[0], 0, dims.hidden_size, dtype=next(model.parameters()).dtype, device=ids.device)
        states.update({(k, i): empty for i in wanted})
        return
    mask = view.attention_mask if past_mask is None else torch.cat([past_mask, view.attention_mask], 1)
    _run_capturing(states, model, wanted, k, ids, mask, positions_from_mask(mask)[:, -ids.shape[1]:], cache)


def _capture(store: dict, key: tuple[int, int]):
    def hook(module, args, output):
        store[key] = output[0] if isinstance(output, tuple) else output

    return hook


def _capture_input(store: dict, key: tuple[int, int]):
    def hook(module, args, kwargs):
        store[key] = args[0] if args else kwargs["hidden_states"]

    return hook
