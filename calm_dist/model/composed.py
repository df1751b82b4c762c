"""The CALM composed model: a frozen anchor, frozen augmenting models, and trainable connections.

Plain single-process PyTorch. Nothing here knows about DeepSpeed or Ray; they wrap this module from
outside. The base models are used unmodified: forward hooks add the cross-attention output to the
anchor's residual stream, and they exist only while a composed forward runs (or while a caller holds
`attached()` open, which activation checkpointing needs since it re-runs layers during backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from calm_dist.errors import CompositionError
from calm_dist.model import connections as conn
from calm_dist.model.alignment import Aligner, AugmentingView, RowState, settled_mask
from calm_dist.model.anchor_alone import AnchorAlone
from calm_dist.model.architectures import ModelDims, decoder_layers, model_dims
from calm_dist.model.augmenting import augmenting_states
from calm_dist.model.cache import ComposedCache
from calm_dist.model.connections import Connection
from calm_dist.model.cross_attention import CrossAttention
from calm_dist.model.masks import cross_attention_mask, positions_from_mask
from calm_dist.model.objectives import keep_anchor_loss, next_token_loss
from calm_dist.model.options import CompositionOptions

# (augmenting model index, augmenting layer) -> hidden states [batch, len, aug_dim]
AugmentingStates = Mapping[tuple[int, int], torch.Tensor]


class ComposedOutput(NamedTuple):
    # A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 walks a module's output for its tensors (to hook
    # their backward) through tuples, lists and dicts only, and warns at every other type.
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class ComposedModel(nn.Module):
    def __init__(
        self,
        anchor: nn.Module,
        augmenting: Sequence[nn.Module] | Sequence[ModelDims],
        connections: Sequence[Connection],
        options: CompositionOptions | None = None,
        aligner: Aligner | None = None,
    ):
        """augmenting: the models, or only their dimensions when their states are computed elsewhere
        (then forward needs augmenting_states=). options: the cross-attention's (calm_dist.model.options);
        `self.options` holds them with num_heads resolved. aligner: the tokenizers, when some augmenting
        model reads the text through a tokenizer of its own (calm_dist.model.alignment)."""
        super().__init__()
        external = [isinstance(m, ModelDims) for m in augmenting]
        if any(external) and not all(external):
            raise CompositionError("give all augmenting models as modules, or all as ModelDims")
        self.anchor_dims: ModelDims = model_dims(anchor)
        self.augmenting_dims: list[ModelDims] = [m if isinstance(m, ModelDims) else model_dims(m) for m in augmenting]
        self.aligner = aligner if aligner is not None and aligner.cross else None
        cross = self.aligner.cross if self.aligner is not None else []
        if aligner is not None and len(aligner.augmenting) != len(augmenting):
            raise CompositionError(f"{len(aligner.augmenting)} augmenting tokenizers for {len(augmenting)} augmenting models")
        for k, dims in enumerate(self.augmenting_dims):
            if k in cross:
                if len(self.aligner.augmenting[k]) > dims.vocab_size:
                    raise CompositionError(
                        f"augmenting model {k}'s tokenizer has {len(self.aligner.augmenting[k])} tokens but the "
                        f"model's vocabulary only {dims.vocab_size}: it is not this model's tokenizer"
                    )
                continue
            if dims.vocab_size != self.anchor_dims.vocab_size:
                raise CompositionError(
                    f"augmenting model {k} ({dims.model_type}) has a vocabulary of {dims.vocab_size} tokens "
                    f"but the anchor ({self.anchor_dims.model_type}) has {self.anchor_dims.vocab_size}: "
                    "give each model's tokenizer (compose(..., tokenizers=[anchor's, augmenting's])) to compose "
                    "across tokenizers"
                )
        conn.validate(connections, [d.num_layers for d in self.augmenting_dims], self.anchor_dims.num_layers)
        self.connections: list[Connection] = sorted(connections)
        self.options = (options or CompositionOptions()).resolved(self.anchor_dims.num_heads)
        # Augmenting model k -> the token ids its keys hide (hide_unknown_tokens).
        self.hidden_ids: dict[int, torch.Tensor] = (
            self.aligner.uninformative_ids() if self.options.hide_unknown_tokens and self.aligner else {})
        if self.options.hide_unknown_tokens and not self.hidden_ids:
            raise CompositionError(
                "hide_unknown_tokens: no augmenting model reads through a tokenizer of its own that has an unknown "
                "token (apart from its bos, eos and pad tokens); give that tokenizer or leave the option off"
            )

        self.anchor = anchor.requires_grad_(False).eval()
        modules = [] if any(external) else augmenting
        self.augmenting = nn.ModuleList(m.requires_grad_(False).eval() for m in modules)
        device = next(anchor.parameters()).device
        width = self.anchor_dims.hidden_size
        try:
            self.composition = nn.ModuleDict(
                {
                    c.name: CrossAttention(self.augmenting_dims[c.augmenting].hidden_size, width,
                                           self.options.num_heads, recency_bias=self.options.recency_bias,
                                           null_attention=self.options.null_attention, dropout=self.options.dropout,
                                           residual_scale=self.options.residual_scale)
                    for c in self.connections
                }
            ).to(device=device, dtype=self.options.dtype)
        except ValueError as err:
            raise CompositionError(f"num_heads={self.options.num_heads}: {err}") from err
        if getattr(anchor, "hf_device_map", None):
            self._place_by_layer()
        self._attach_depth = 0
        self._step: dict | None = None  # what the hooks need during one forward; None outside it

    def _place_by_layer(self) -> None:
        """With the anchor spread over devices (from_pretrained(device_map="auto")), each connection's
        cross-attention lives where its anchor layer runs, so the residual stream never moves for it."""
        layers = decoder_layers(self.anchor)
        for c in self.connections:
            layer = layers[max(c.anchor_layer, 0)]  # INPUT: where the first layer runs
            hook = getattr(layer, "_hf_hook", None)  # accelerate's: weights offloaded, run elsewhere
            device = getattr(hook, "execution_device", None) or next(layer.parameters()).device
            self.composition[c.name].to(device)

    # ----------------------------------------------------------------------------------------------
    # Parameters and modes

    def composition_parameters(self) -> Iterator[nn.Parameter]:
        return self.composition.parameters()

    def composition_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.composition.state_dict().items()}

    def expected_composition_parameters(self) -> int:
        width = self.anchor_dims.hidden_size
        return sum(
            CrossAttention.parameter_count(self.augmenting_dims[c.augmenting].hidden_size, width,
                                           self.options.num_heads, self.options.recency_bias)
            for c in self.connections
        )

    def train(self, mode: bool = True) -> ComposedModel:
        # Base models stay in eval mode: they are frozen, and dropout in them would only add noise
        # and make cached decoding differ from recomputation.
        self.training = mode
        self.composition.train(mode)
        self.anchor.eval()
        self.augmenting.eval()
        # Transformers re-runs a layer in backward (activation checkpointing) only if that layer is in
        # training mode. Flag the layers themselves, not their submodules, so dropout stays off.
        for layer in decoder_layers(self.anchor):
            if getattr(layer, "gradient_checkpointing", False):
                layer.training = mode
        return self

    # ----------------------------------------------------------------------------------------------
    # Forward

    def new_cache(self) -> ComposedCache:
        if not self.augmenting:
            raise CompositionError("cached decoding needs the augmenting models, not only their dimensions")
        return ComposedCache(
            anchor=DynamicCache(config=self.anchor.config),
            augmenting=[DynamicCache(config=m.config) for m in self.augmenting],
        )

    def augmenting_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, cache: ComposedCache | None = None,
                          views: Sequence[AugmentingView | None] | None = None) -> dict[tuple[int, int], torch.Tensor]:
        """Hidden states of every connected augmenting layer, computed without autograd."""
        if not self.augmenting:
            raise CompositionError(
                "this composed model was built from augmenting-model dimensions only: pass "
                "augmenting_states= to forward (they are computed where the augmenting models live)"
            )
        return augmenting_states(
            list(self.augmenting), self.connections, input_ids, attention_mask, position_ids,
            cache.augmenting if cache is not None else None, views,
            cache.augmenting_masks if cache is not None else None,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        augmenting_states: AugmentingStates | None = None,
        cache: ComposedCache | None = None,
        augmenting_views: Sequence[AugmentingView | None] | None = None,
        keep_anchor: torch.Tensor | None = None,
        keep_anchor_weight: float = 1.0,
    ) -> ComposedOutput:
        """Composed logits (and next-token loss if labels are given).

        keep_anchor [B] (bool, with labels): rows whose loss is the KL divergence from the anchor
        alone's predictions rather than their labels' cross-entropy (calm_dist.model.objectives); the
        anchor's layers above the lowest connection run once more, without gradients, on those rows
        (calm_dist.model.anchor_alone); keep_anchor_weight weighs that KL term against the labels' one.

        With a cache, input_ids are only the new tokens and attention_mask covers past and new tokens,
        as in Hugging Face models; the cache is updated in place. augmenting_views: for augmenting
        models with a tokenizer of their own, their tokens and visibility (computed from input_ids by
        the aligner when not given; the data pipeline gives them precomputed).
        """
        past = cache.seq_length() if cache is not None else 0
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(
                input_ids.shape[0], past + length, dtype=torch.long, device=input_ids.device
            )
        position_ids = positions_from_mask(attention_mask)[:, -length:]
        if self.aligner is not None and augmenting_views is None:
            augmenting_views = self._align(input_ids, attention_mask, cache)
        if augmenting_states is None:
            augmenting_states = self.augmenting_states(input_ids, attention_mask, position_ids, cache, augmenting_views)
        views = list(augmenting_views or [])
        views += [None] * (len(self.augmenting_dims) - len(views))
        visible_masks = {}
        for k, view in enumerate(views):
            if view is not None:
                past_mask = cache.augmenting_masks.get(k) if cache is not None else None
                full = view.attention_mask if past_mask is None else torch.cat([past_mask, view.attention_mask], 1)
                if cache is not None:
                    cache.augmenting_masks[k] = full
                visible_masks[k] = settled_mask(full, view.visible, self._readable(k, view, cache))

        alone = None
        if labels is not None and keep_anchor is not None and keep_anchor.any():
            keep_anchor = keep_anchor.to(device=input_ids.device, dtype=torch.bool)
            alone = AnchorAlone(self.anchor, self.connections[0].anchor_layer)  # sorted: the lowest first

        keys_values = {}
        for c in self.connections:
            crossing = self.composition[c.name]
            # Where the block lives (it may differ from the augmenting layer's device when models are spread).
            states = augmenting_states[(c.augmenting, c.aug_layer)].to(next(crossing.parameters()).device)
            keys, values = crossing.keys_values(states)
            if cache is not None:
                keys, values = cache.extend(c.name, keys, values)
            keys_values[c.name] = (keys, values)

        shared = cross_attention_mask(attention_mask, past, length) if len(visible_masks) < len(views) else None
        allowed = {k: visible_masks.get(k, shared) for k in range(len(views))}

        with self.attached():
            self._step = {"keys_values": keys_values, "allowed": allowed}
            try:
                with alone.capturing(keep_anchor) if alone is not None else contextlib.nullcontext():
                    logits = self.anchor(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        past_key_values=cache.anchor if cache is not None else None,
                        use_cache=cache is not None,
                    ).logits
            finally:
                if self._attach_depth == 1:
                    self._step = None
        if labels is None:
            loss = None
        elif alone is None:
            loss = next_token_loss(logits, labels)
        else:
            # A caller holding attached() open keeps this step's state for backward; the anchor alone
            # must meet pass-through hooks.
            step, self._step = self._step, None
            try:
                anchor_logits = alone.logits(input_ids[keep_anchor], attention_mask[keep_anchor], position_ids[keep_anchor])
            finally:
                self._step = step
            loss = keep_anchor_loss(logits, labels, keep_anchor, anchor_logits, keep_anchor_weight)
        return ComposedOutput(logits=logits, loss=loss)

    def _readable(self, k: int, view: AugmentingView, cache: ComposedCache | None) -> torch.Tensor | None:
        """bool [batch, aug_len so far]: model k's tokens the cross-attention may read (hide_unknown_tokens),
        or None for all of them."""
        if k not in self.hidden_ids:
            return None
        readable = ~torch.isin(view.input_ids, self.hidden_ids[k].to(view.input_ids.device))
        if cache is not None:
            past = cache.readable_masks.get(k)
            readable = readable if past is None else torch.cat([past, readable], 1)
            cache.readable_masks[k] = readable
        return readable

    def _align(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: ComposedCache | None
    ) -> list[AugmentingView | None]:
        """Views of the cross-tokenizer augmenting models, from the anchor ids (and a cache's state)."""
        if cache is None:
            return self.aligner.step(input_ids, attention_mask, input_ids.shape[1], None)
        all_ids = input_ids if cache.anchor_ids is None else torch.cat([cache.anchor_ids, input_ids], 1)
        cache.anchor_ids = all_ids
        if cache.rows is None:
            cache.rows = [RowState(tokens=[[] for _ in self.augmenting_dims]) for _ in range(input_ids.shape[0])]
        return self.aligner.step(all_ids, attention_mask, input_ids.shape[1], cache.rows)

    # ----------------------------------------------------------------------------------------------
    # Hooks

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Keep the composition hooks on the anchor while the block runs.

        forward() enters this by itself. Hold it open around forward *and* backward when the anchor
        uses activation checkpointing: transformers versions that checkpoint a layer's __call__ re-run
        its hooks in backward, which must then add the same cross-attention output.
        """
        if self._attach_depth:
            self._attach_depth += 1
            try:
                yield
            finally:
                self._attach_depth -= 1
            return
        layers = decoder_layers(self.anchor)
        by_layer: dict[int, list[Connection]] = {}
        for c in self.connections:
            by_layer.setdefault(c.anchor_layer, []).append(c)
        handles = []
        for j, at_layer in sorted(by_layer.items()):
            if j == conn.INPUT:  # the first layer's input is the embedding output
                handles.append(layers[0].register_forward_pre_hook(self._make_input_hook(at_layer), with_kwargs=True))
            else:
                handles.append(layers[j].register_forward_hook(self._make_hook(at_layer)))
        self._attach_depth = 1
        try:
            yield
        finally:
            self._attach_depth = 0
            self._step = None
            for handle in handles:
                handle.remove()

    def _cross_attended(self, hidden: torch.Tensor, at_layer: list[Connection]) -> torch.Tensor:
        """hidden plus the cross-attention outputs of the connections into this point of the anchor."""
        delta = None
        for c in at_layer:
            keys, values = self._step["keys_values"][c.name]
            allowed = self._step["allowed"][c.augmenting]
            term = self.composition[c.name](hidden, keys, values, allowed.to(hidden.device) if allowed is not None else None)
            delta = term if delta is None else delta + term
        return hidden + delta.to(hidden.dtype)

    def _make_hook(self, at_layer: list[Connection]):
        def add_cross_attention(module, args, output):
            if self._step is None:  # anchor called on its own while attached: stay the plain anchor
                return output
            if isinstance(output, tuple):
                return (self._cross_attended(output[0], at_layer), *output[1:])
            return self._cross_attended(output, at_layer)

        return add_cross_attention

    def _make_input_hook(self, at_layer: list[Connection]):
        def add_cross_attention(module, args, kwargs):
            if self._step is None:
                return None
            if args:  # decoder layers take hidden_states first, positionally or by name
                return (self._cross_attended(args[0], at_layer), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._cross_attended(kwargs["hidden_states"], at_layer)}

        return add_cross_attention


def compose(
    anchor: nn.Module,
    augmenting: nn.Module | Sequence[nn.Module],
    connections: Sequence[Connection] | None = None,
    every_n: int = 4,
    tokenizers: Sequence[PreTrainedTokenizerBase | None] | None = None,
    options: CompositionOptions | None = None,
    **option_values,
) -> ComposedModel:
    """Compose models, connecting every `every_n`-th augmenting layer unless connections are given.

    tokenizers: [the anchor's, augmenting model 0's, ...] when some augmenting model has a tokenizer
    of its own (None, or the anchor's tokenizer, for one that reads the anchor's token ids).
    options, or their fields by name (num_heads=8, dtype=torch.bfloat16, recency_bias=True, ...): see
    calm_dist.model.options.CompositionOptions.
    """
    if isinstance(augmenting, nn.Module):
        augmenting = [augmenting]
    unknown = sorted(set(option_values) - set(CompositionOptions.names()))
    if unknown:
        raise TypeError(f"compose() got unknown options {unknown}; the options are {CompositionOptions.names()}")
    options = replace(options or CompositionOptions(), **option_values)
    aligner = None
    if tokenizers is not None:
        if len(tokenizers) != len(augmenting) + 1 or tokenizers[0] is None:
            raise CompositionError(
                f"tokenizers: give the anchor's tokenizer and one per augmenting model ({len(augmenting) + 1} "
                f"in all, None for a model that shares the anchor's), got {len(tokenizers)}"
            )
        aligner = Aligner(tokenizers[0], tokenizers[1:])
    if connections is None:
        connections = conn.every_n_all(len(decoder_layers(anchor)), [len(decoder_layers(m)) for m in augmenting],
                                       every_n)
    return ComposedModel(anchor, augmenting, connections, options, aligner=aligner)
