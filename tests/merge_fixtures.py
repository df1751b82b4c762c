"""Builders for the merge tests: tiny seeded checkpoints (Hugging Face models or raw safetensors),
a character tokenizer with no pad token, configs, and readers of a merged folder."""

from __future__ import annotations

import json
from functools import reduce
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from merge.methods import BLOCK
from merge.plan import WORKER_OVERHEAD

CHARS = [chr(c) for c in range(32, 127)]
VOCAB = 3 + len(CHARS)  # <unk>, <s>, </s>, printable ASCII


def char_tokenizer(folder: Path) -> None:
    """One token per character, a BOS token, and no pad token (as many decoders)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def tiny_llama(
    folder: Path,
    seed: int,
    *,
    vocab: int = VOCAB,
    tie: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: str | None = None,
    tokenizer: bool = True,
    scale: float = 1.0,
):
    """A seeded 2-layer Llama saved as safetensors (sharded when shard_size is given); returns the model.
    `scale` multiplies every weight, to make models that differ a lot."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model = model.to(dtype).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    if tokenizer:
        char_tokenizer(folder)
    return model


def raw_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1) -> Path:
    """Tensors written with the safetensors library, in `shards` files with an index when > 1."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(folder / filename))
            weight_map |= dict.fromkeys(part, filename)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "tie_word_embeddings": False}))
    return folder


def random_tensors(seed: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}


# Tensors spanning several blocks, with a partial last block, so chunking is exercised.
BIG_SHAPES = {"embed.weight": (700, 1000), "layer.weight": (300, 1000), "norm.weight": (1000,)}


def budget_for_blocks(blocks: int, per_element: int, workers: int = 1) -> int:
    """A memory_budget under which each worker's chunks are `blocks` blocks long, when the costliest
    tensor needs `per_element` bytes per element in flight (OUT_BUFFERS output copies, two of each input)."""
    return workers * (WORKER_OVERHEAD + per_element * BLOCK * blocks + per_element)


def write_config(folder: Path, data: dict, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str))))
    return path


def read_merged(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(str(path))
    return tensors


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file in a folder (hidden ones too), for byte-for-byte comparison."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def weighted_sum(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i x_i in fp32, in order, each term rounded before it is added: the exact merge."""
    return reduce(lambda acc, term: acc + term, [x.float() * w for x, w in zip(xs[1:], weights[1:], strict=True)], xs[0].float() * weights[0])
