"""The merge plan: each output tensor's sources, the shards, and the chunk size.

What each output tensor is made of, how the outputs are grouped into shards, and how large a chunk
each worker may hold.

A shard task is self-contained and picklable (file paths, byte offsets, weights, parameters), so a
local process or a Ray task on another node can run it with nothing but the shared filesystem.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass
from typing import Any

from merge.io.safetensors_file import ITEMSIZE, TensorInfo, build_header
from merge.merge_config import OUTPUT_DTYPES, MergeConfig, Override
from merge.merge_errors import ConfigError, IncompatibleInputsError
from merge.methods.specs import BLOCK, SPECS, block_elements
from merge.planning.inputs import InputLayout, TensorGroup
from merge.planning.vocab import VocabRows, remap_bytes

COPY = "copy"  # integer tensors: copied from one model
# Resident memory of a worker before any chunk: the interpreter, torch and its thread pools, the
# writer's staging buffers (merge.io.safetensors_file.WRITE_STAGES).
WORKER_OVERHEAD = 320 * 2**20
# Threads computing a chunk's pieces in each worker (merge.execution.stream): torch releases the GIL.
COMPUTE_THREADS = min(2, os.cpu_count() or 1)
# Output chunks in flight per worker: one being computed, one queued, one being written.
OUT_BUFFERS = 3
# Above this, bigger chunks only delay the first write; below the budget's limit, smaller is fine.
MAX_CHUNK = 64 * BLOCK
# Input bytes a worker may hold read ahead of its arithmetic, budget allowing: a process spends a second
# or more importing torch before its arithmetic starts, in which a disk can read about this much.
READ_AHEAD_BYTES = 2**30


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sources: tuple[TensorInfo, ...]  # in the method's order (base first); numel of each read = numel here
    method: str
    weights: tuple[float, ...]
    params: dict[str, Any]
    seed: int
    # A vocabulary tensor whose rows are remapped by token (merge.planning.vocab), inputs in the method's
    # order: merged whole in memory (merge.execution.vocab_rows), not streamed in chunks.
    rows: VocabRows | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def block(self) -> int:
        """Elements per block of this tensor's method (merge.methods.specs.block_elements)."""
        return block_elements(SPECS.get(self.method), self.shape)

    def chunk(self, chunk_elems: int) -> int:
        """The planned chunk, in whole blocks of this tensor (at least one: a block is at most BLOCK)."""
        return max(1, chunk_elems // self.block) * self.block


@dataclass(frozen=True)
class ShardTask:
    filename: str
    out_dir: str
    tensors: tuple[OutputTensor, ...]  # in file order
    chunk_elems: int
    read_slots: int = 2  # input chunks held at once: the one computed and those read ahead (merge.io.reader)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """The shard file's size: header plus data."""
        header = build_header([(t.name, t.dtype, t.shape) for t in self.tensors])
        return len(header) + sum(t.nbytes for t in self.tensors)


def plan_tensors(cfg: MergeConfig, layout: InputLayout, weights: list[float]) -> list[OutputTensor]:
    """Resolve every output tensor: method, weights and parameters (overrides applied), dtype, sources."""
    used = [False] * len(cfg.overrides)
    copy_from = integer_source(cfg)
    outputs = []
    for group in layout.groups:
        if not group.is_float:
            source = group.sources[copy_from]
            outputs.append(OutputTensor(group.name, source.dtype, group.shape, (source,), COPY, (), {}, cfg.seed))
            continue
        hit = next((i for i, o in enumerate(cfg.overrides) if fnmatch.fnmatchcase(group.name, o.pattern)), None)
        override = cfg.overrides[hit] if hit is not None else None
        if hit is not None:
            used[hit] = True
        params = cfg.params_for(override)
        refuses = cfg.merge_method.refuses
        if refuses is not None and (problem := refuses(group.shape, params)):
            raise ConfigError(f"tensor '{group.name}': {problem}. Merge it with parameters.density: 1 (an "
                              f"overrides entry matching it) or leave it out (drop:)")
        sources = tuple(group.sources[i] for i in cfg.source_order)
        outputs.append(
            OutputTensor(
                group.name, _output_dtype(cfg, group), group.shape, sources, cfg.method,
                effective_weights(cfg, override, weights), params.model_dump(by_alias=True), cfg.seed,
                group.rows.reordered(cfg.source_order) if group.rows else None,
            )
        )
    for i, hit in enumerate(used):
        if not hit:
            raise ConfigError(f"overrides[{i}].pattern: {cfg.overrides[i].pattern!r} matches no floating-point tensor")
    return outputs


def integer_source(cfg: MergeConfig) -> int:
    """The model whose integer tensors are copied (they are not merged): integer_tensors_from, else the base."""
    return cfg.index(cfg.integer_tensors_from) if cfg.integer_tensors_from else (cfg.base_index or 0)


def _output_dtype(cfg: MergeConfig, group: TensorGroup) -> str:
    if cfg.output.dtype is not None:
        return OUTPUT_DTYPES[cfg.output.dtype]
    dtypes = {s.dtype for s in group.sources}
    if len(dtypes) > 1:
        found = ", ".join(f"{name}: {s.dtype}" for name, s in zip(cfg.names, group.sources, strict=True))
        raise IncompatibleInputsError(
            f"tensor '{group.name}': the inputs' dtypes differ ({found}); set output.dtype to choose the output's"
        )
    return dtypes.pop()


def effective_weights(cfg: MergeConfig, override: Override | None, weights: list[float]) -> tuple[float, ...]:
    """The weights a tensor is merged with: the override's or the config's, as given (linear divides
    by their sum itself, once, after summing: see merge.methods.registry.linear)."""
    chosen = override.weights if override is not None and override.weights is not None else weights
    return tuple(chosen)


def shown_weights(cfg: MergeConfig, weights: list[float]) -> list[float]:
    """The weights as a share of the whole, for people: w / sum(w) when linear normalizes."""
    if cfg.method == "linear" and cfg.params_for(None).normalize:
        total = math.fsum(weights)
        return [w / total for w in weights]
    return list(weights)


def default_weights(cfg: MergeConfig) -> list[float]:
    """Weights when the config gives none: uniform for linear, 1 per task vector otherwise."""
    if cfg.weights is not None:
        return list(cfg.weights)
    if not cfg.merge_method.takes_weights:
        return []
    if cfg.method == "linear":
        return [1.0 / len(cfg.models)] * len(cfg.models)
    return [1.0] * cfg.mixed_count


def group_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Consecutive tensors filled into shards of at most max_shard_size bytes (a larger tensor alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    # Widest dtypes first inside a file keeps every tensor aligned to its element size.
    return [sorted(shard, key=lambda t: -ITEMSIZE[t.dtype]) for shard in shards if shard]


def shard_filenames(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def chunk_plan(tensors: list[OutputTensor], memory_budget: int, workers: int) -> tuple[int, int]:
    """The largest chunk (a multiple of BLOCK elements) that keeps each worker within its share of the
    budget: OUT_BUFFERS output chunks, plus the input buffers of the chunk being computed and of the
    one read ahead. And how many chunks' inputs may be held at once, with what the budget has left
    (at least those 2, at most READ_AHEAD_BYTES)."""
    out_bytes = max(ITEMSIZE[t.dtype] for t in tensors)
    in_bytes = max(sum(ITEMSIZE[s.dtype] for s in t.sources) for t in tensors)
    per_element = OUT_BUFFERS * out_bytes + 2 * in_bytes
    whole = largest_remap(tensors) + largest_held_masks(tensors)
    available = memory_budget // workers - WORKER_OVERHEAD - whole
    blocks = available // (per_element * BLOCK) if available > 0 else 0
    if blocks < 1:
        needed = workers * (WORKER_OVERHEAD + whole + per_element * BLOCK)
        held = f" (held whole: a vocabulary tensor remapped by token, DELLA's keep masks: {whole} bytes)" if whole else ""
        raise ConfigError(
            f"memory_budget: {memory_budget} bytes is too small for {workers} worker(s); at least {needed} are "
            f"needed{held}"
        )
    chunk = min(blocks * BLOCK, MAX_CHUNK)
    # A chunk's buffer is filled no further than the largest tensor.
    slot = max(1, min(chunk, max(t.numel for t in tensors)) * in_bytes)
    spare_slots = (available - chunk * per_element) // slot
    return chunk, 2 + max(0, min(spare_slots, READ_AHEAD_BYTES // slot - 2))


def largest_held_masks(tensors: list[OutputTensor]) -> int:
    """Bytes of the masks a method's statistic holds for the merge pass of the tensor that needs most
    (merge.methods.specs.MethodSpec.held_mask_bits): a tensor's masks live until it is merged."""
    return max((-(-t.numel * SPECS[t.method].held_mask_bits // 8) * (len(t.sources) - 1) for t in tensors
                if t.method in SPECS and SPECS[t.method].held_mask_bits), default=0)


def largest_remap(tensors: list[OutputTensor]) -> int:
    """Bytes the largest vocabulary tensor remapped by token holds while it is merged whole."""
    return max((remap_bytes(t.rows, [s.shape for s in t.sources], ITEMSIZE[t.dtype]) for t in tensors if t.rows),
               default=0)


def build_tasks(cfg: MergeConfig, tensors: list[OutputTensor]) -> list[ShardTask]:
    shards = group_shards(tensors, int(cfg.output.max_shard_size))
    chunk, read_slots = chunk_plan(tensors, int(cfg.memory_budget), cfg.workers)
    return [
        ShardTask(name, str(cfg.output.path), tuple(shard), chunk, read_slots)
        for name, shard in zip(shard_filenames(len(shards)), shards, strict=True)
    ]
