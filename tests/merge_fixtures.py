"""Builders for the merge tests: raw safetensors checkpoints, configs, readers of a merged folder, and
the exact linear formula. Tiny Hugging Face models come from calm_dist.testing.tiny_checkpoints (the demo's builders)."""

from __future__ import annotations

import json
from fractions import Fraction
from functools import reduce
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from merge.methods.specs import BLOCK
from merge.planning.plan import WORKER_OVERHEAD


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


def budget_for_blocks(blocks: int, per_element: int, workers: int = 1, held: int = 0) -> int:
    """A memory_budget under which each worker's chunks are `blocks` blocks long, when the costliest
    tensor needs `per_element` bytes per element in flight (OUT_BUFFERS output copies, two of each input)
    and a worker holds `held` bytes whole (merge.planning.plan.chunk_plan: DELLA's masks)."""
    return workers * (WORKER_OVERHEAD + held + per_element * BLOCK * blocks + per_element)


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


def round_to_bf16(values: torch.Tensor) -> torch.Tensor:
    """float64 values (normal bf16 range) rounded to 8 significant bits, ties to even, by integer
    arithmetic on their bits: a reference independent of torch's and merge's conversions."""
    bits = values.double().view(torch.int64)
    drop = 52 - 7
    bits = bits + (1 << (drop - 1)) - 1 + ((bits >> drop) & 1)
    return (bits >> drop << drop).view(torch.float64).to(torch.bfloat16)


def exact_bf16(value: Fraction) -> float:
    """A rational value correctly rounded to bf16 (normal range), decided with exact arithmetic."""
    bits = torch.tensor([float(value)], dtype=torch.float64).view(torch.int64)
    low = (bits >> 45 << 45).view(torch.float64).item()  # truncated toward zero
    high = ((bits >> 45) + 1 << 45).view(torch.float64).item()
    d_low, d_high = abs(Fraction(low) - value), abs(Fraction(high) - value)
    if d_low != d_high:
        return low if d_low < d_high else high
    return low if (int(bits) >> 45) & 1 == 0 else high


def exact_linear_bf16(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i with exact rational arithmetic, each element rounded once to bf16."""
    ws = [Fraction(w) for w in weights]
    total = sum(ws)
    flat = [x.flatten().tolist() for x in xs]
    values = [exact_bf16(sum(w * Fraction(v) for w, v in zip(ws, column, strict=True)) / total) for column in zip(*flat, strict=True)]
    return torch.tensor(values, dtype=torch.float64).to(torch.bfloat16).reshape(xs[0].shape)
