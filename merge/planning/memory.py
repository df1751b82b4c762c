"""Memory and time of a merge, from its plan alone (`calm plan` on a merge config).

One merge worker's peak, the weights-from-examples step's peak, and the seconds the disk needs.

Pure arithmetic: no torch, no files. launcher/plan/command.py describes the merge (MergeSetup, from
merge.planning.plan and merge.io.reader); the terms share Term and WorkerPlan with a training run's
plan (calm_dist.distributed.memory_plan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from calm_dist.distributed.memory_plan import Term, WorkerPlan
from merge.methods.specs import SPECS
from merge.planning.plan import COMPUTE_THREADS


@dataclass(frozen=True)
class MergeSetup:
    inputs: int  # candidate models
    input_bytes: int  # bytes of one input's tensors
    output_bytes: int
    largest_input_itemsize: int
    output_itemsize: int
    chunk_elements: int  # from merge.planning.plan.chunk_plan
    read_slots: int  # input chunks held at once, also from merge.planning.plan.chunk_plan
    read_bytes: int  # buffer room all the merge's reads take together (merge.io.reader.slot_bytes of each chunk)
    largest_tensor: int  # elements of the largest output tensor
    block: int  # merge.methods.registry.BLOCK
    out_buffers: int  # merge.planning.plan.OUT_BUFFERS
    worker_runtime: int  # merge.planning.plan.WORKER_OVERHEAD
    workers: int
    max_shard_bytes: int
    loss_model_bytes: int = 0  # weights from examples: the largest candidate scored
    loss_workers: int = 1  # weights_from_examples.workers: candidates partitioned over this many ranks
    loss_tokens: int = 0  # batch_size x max_length
    vocab: int = 0
    # The merge method (merge_config.method): sizes its block arithmetic and its whole-tensor
    # statistic (merge.methods.specs.MethodSpec). None: two fp32 arrays per input, no statistic.
    method: str | None = None
    # The largest vocabulary tensor remapped by token (tokenizer:), merged whole (merge.planning.plan.largest_remap).
    remap_bytes: int = 0
    # The masks a statistic holds for its tensor's merge pass (DELLA's; merge.planning.plan.largest_held_masks).
    held_mask_bytes: int = 0
    # passthrough copies each output tensor from one input, reading only the tensors its slices use:
    # the inputs each chunk reads (0: all of them) and the bytes read in all (0: every input in full).
    tensor_sources: int = 0
    sliced_read_bytes: int = 0

    @property
    def total_read_bytes(self) -> int:
        return self.sliced_read_bytes or self.inputs * self.input_bytes


def merge_terms(setup: MergeSetup) -> WorkerPlan:
    """Peak anonymous memory of one merge worker."""
    # A buffer's pages are touched only as far as a chunk fills it: no further than the largest tensor.
    chunk = min(setup.chunk_elements, setup.largest_tensor)
    # Chunks share the buffers, so inputs smaller than them never touch all of their pages.
    read_buffers = setup.read_slots * chunk * (setup.tensor_sources or setup.inputs) * setup.largest_input_itemsize
    terms = [
        Term("input read buffers", min(read_buffers, setup.read_bytes),
             f"{setup.read_slots} chunks of every input: the one computed and those read ahead"
             if read_buffers <= setup.read_bytes else "every input: they fit the read-ahead"),
        Term("output chunk buffers", setup.out_buffers * chunk * setup.output_itemsize,
             f"{setup.out_buffers} chunks of {chunk:,} elements: computed, queued, being written"),
        block_term(setup),
        *statistic_terms(setup),
        *([Term("vocabulary tensor, whole", setup.remap_bytes,
                "remapped by token (tokenizer:): every input's rows and the output's, in fp32")]
          if setup.remap_bytes else []),
        Term("runtime allowance", setup.worker_runtime, "interpreter and torch (merge.planning.plan.WORKER_OVERHEAD)"),
    ]
    return WorkerPlan("merge worker", tuple(terms))


def block_term(setup: MergeSetup) -> Term:
    """The fp32 arrays of one block a combine holds at once, on each compute thread."""
    if setup.method is None:
        return Term("fp32 block arithmetic", (setup.inputs + 2) * setup.block * 4,
                    f"{setup.inputs} inputs and the result, {setup.block:,} elements at a time")
    if SPECS[setup.method].arrays_per_input == 0:
        return Term("fp32 block arithmetic", 0, f"{setup.method}: copies, no arithmetic")
    arrays = SPECS[setup.method].arrays_per_input * setup.inputs + 2
    return Term("fp32 block arithmetic", COMPUTE_THREADS * arrays * setup.block * 4,
                f"{setup.method}: {arrays} arrays of {setup.block:,} elements on each of {COMPUTE_THREADS} threads")


def statistic_terms(setup: MergeSetup) -> list[Term]:
    """A whole-tensor statistic's state (TIES, Breadcrumbs, SCE: magnitude histograms), and its passes."""
    if setup.method is None or SPECS[setup.method].reads == 1:
        return []
    spec = SPECS[setup.method]
    terms = [Term("whole-tensor statistic", spec.statistic_bytes_per_input * setup.inputs,
                  f"{spec.reads - 1} pass(es) over each tensor before its merge pass: a tensor of one chunk is read "
                  "once and held, one of several is read again through the page cache")]
    if setup.held_mask_bytes:
        terms.append(Term("masks held for the merge pass", setup.held_mask_bytes,
                          f"{spec.held_mask_bits} bit(s) an element of the largest tensor, per task vector"))
    return terms


def loss_terms(setup: MergeSetup) -> WorkerPlan:
    """Peak memory of the weights-from-examples step: one candidate (or 1/N of it), logits, loss."""
    terms = [
        Term("candidate weights", math.ceil(setup.loss_model_bytes / setup.loss_workers),
             "one candidate at a time" + (f", 1/{setup.loss_workers} per worker" if setup.loss_workers > 1 else "")),
        Term("logits and loss", setup.loss_tokens * setup.vocab * (4 + 4 + 4),
             f"{setup.loss_tokens:,} tokens x {setup.vocab:,}: logits, fp32 copy, per-token loss"),
        Term("runtime allowance", setup.worker_runtime, "interpreter, torch, transformers"),
    ]
    return WorkerPlan("loss worker", tuple(terms))


def merge_seconds(setup: MergeSetup, read_bytes_per_s: float, write_bytes_per_s: float) -> float:
    """Reading every input and writing the output at the disk's speed (the merge overlaps its arithmetic)."""
    return setup.total_read_bytes / read_bytes_per_s + setup.output_bytes / write_bytes_per_s
