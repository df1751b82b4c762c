"""Tiny, seeded, randomly initialised causal LMs of several families.

Nothing can be downloaded in tests or the demo, so every model there is built from a config here.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")


def tiny_config(
    family: str = "llama", layers: int = 4, width: int = 64, heads: int = 4, vocab: int = 128,
    tied: bool | None = None,
) -> PretrainedConfig:
    """tied: the output head shares the input embedding (default: as the family usually does, GPT-2 only)."""
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if tied is not None:
        common["tie_word_embeddings"] = tied
    if family == "gpt2":
        return GPT2Config(
            n_layer=layers, n_embd=width, n_head=heads, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    decoder = dict(
        num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=2 * width,
        max_position_embeddings=512, **{"tie_word_embeddings": False, **common},
    )
    if family == "llama":
        return LlamaConfig(**decoder)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **decoder)
    if family == "qwen2":
        return Qwen2Config(**decoder)
    if family == "gemma":
        return GemmaConfig(head_dim=width // heads, **decoder)
    raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")


def tiny_model(
    family: str = "llama",
    layers: int = 4,
    width: int = 64,
    heads: int = 4,
    vocab: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tied: bool | None = None,
) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, width, heads, vocab, tied))
    return model.to(dtype).eval()
