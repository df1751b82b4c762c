"""Where each Hugging Face causal-LM family keeps its decoder layers, and its dimensions.

Composition needs three things of a model: the list of decoder layers (to read or add to their
outputs), the hidden width and the attention head count. Families differ only in where the layers
live, so supporting a new one is usually one line in DECODER_LAYERS.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from calm_dist.errors import CompositionError

# model_type -> attribute path of the decoder-layer ModuleList inside the *ForCausalLM model.
DECODER_LAYERS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
}


@dataclass(frozen=True)
class ModelDims:
    """What composition needs to know of one base model."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _resolve(model: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        model = getattr(model, name)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM, in order."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = DECODER_LAYERS.get(model_type)
    if path is None:
        raise CompositionError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a supported architecture. "
            f"Supported: {', '.join(sorted(DECODER_LAYERS))}. To add one, map its model_type to the "
            "attribute path of its decoder-layer ModuleList in calm_dist.model.architectures.DECODER_LAYERS "
            "(for example 'model.layers')."
        )
    try:
        layers = _resolve(model, path)
    except AttributeError as err:
        raise CompositionError(
            f"{type(model).__name__} has model_type={model_type!r} but no '{path}': pass the causal-LM "
            "class (AutoModelForCausalLM), not the bare backbone"
        ) from err
    return layers


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM head: the augmenting models need hidden states, never logits."""
    return model.base_model


def model_dims(model: nn.Module) -> ModelDims:
    config = model.config
    return ModelDims(
        model_type=config.model_type,
        num_layers=len(decoder_layers(model)),
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
    )


def dims_from_config(config) -> ModelDims:
    """ModelDims of a model from its config alone, for ranks that never load it."""
    if config.model_type not in DECODER_LAYERS:
        raise CompositionError(f"model_type={config.model_type!r} is not a supported architecture")
    return ModelDims(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
    )
