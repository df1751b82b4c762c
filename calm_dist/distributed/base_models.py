"""The frozen base models and tokenizers as a worker holds them: the anchor straight into its ZeRO-3
partition, augmenting models whole beside it (they are small and run without gradients).

A model is named by a spec with `path`, `dtype` (a torch dtype's name) and `trust_remote_code`, as the
training config's models.* entries and `calm eval`'s job give them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from calm_dist.distributed.partitioned_loading import load_partitioned
from calm_dist.model.alignment import Aligner
from calm_dist.model.decoding import pad_token_id


class ModelSource(Protocol):
    path: str
    dtype: str
    trust_remote_code: bool


def base_config(spec: ModelSource) -> PretrainedConfig:
    return AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)


def load_whole(specs: Sequence[ModelSource], device: torch.device) -> list[torch.nn.Module]:
    """Frozen models held whole on this rank (the augmenting models beside a partitioned anchor)."""
    return [
        AutoModelForCausalLM.from_pretrained(s.path, dtype=getattr(torch, s.dtype), trust_remote_code=s.trust_remote_code)
        .to(device).requires_grad_(False).eval()
        for s in specs
    ]


def load_anchor(spec: ModelSource, ds_config: dict, device: torch.device) -> torch.nn.Module:
    """The frozen anchor as the DeepSpeed config's ZeRO stage wants it: under stage 3 loaded straight
    into this rank's partition (no rank holds it whole); under stages 0-2 whole on this rank's device."""
    if ds_config["zero_optimization"]["stage"] == 3:
        return load_partitioned(spec.path, ds_config, getattr(torch, spec.dtype), trust_remote_code=spec.trust_remote_code)
    return load_whole([spec], device)[0]


def load_tokenizer(path: str) -> tuple[PreTrainedTokenizerBase, int]:
    """(tokenizer, the id to pad with)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, pad_token_id(tokenizer)


def own_tokenizers(tokenizer: PreTrainedTokenizerBase, paths: Sequence[str | None]) -> tuple[Aligner | None, list[int]]:
    """(aligner, augmenting pad ids) for augmenting models reading the text through the tokenizers at
    `paths` (None: the model reads the anchor's tokens), or (None, []) when none has its own."""
    own = [load_tokenizer(path)[0] if path else None for path in paths]
    if all(t is None for t in own):
        return None, []
    aligner = Aligner(tokenizer, own)
    return aligner, [aligner.pad_id(k) if t is not None else 0 for k, t in enumerate(own)]
