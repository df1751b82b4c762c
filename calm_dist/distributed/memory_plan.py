"""Memory per worker of a composition run, from the models' shapes alone.

Pure arithmetic: no torch, no files. Callers describe the models (ModelShape, from a Hugging Face
config built on the meta device) and the run (TrainSetup); train_plan() returns one Term per thing
that occupies a worker's memory (the changes that would make a run fit: calm_dist.distributed.
fit_suggestions). A merge's memory is merge/planning/memory.py, with the same Term and WorkerPlan.

What is counted, per anchor worker at its peak (the end of the forward pass, when every saved
activation, the logits and the loss are alive at once):
- the anchor's ZeRO-3 partition: each tensor 1/N, except those DeepSpeed keeps whole on every rank
  (at most `stage3_param_persistence_threshold` elements: norms, small projections);
- the ZeRO-3 gathered working set: the full copies of the anchor layers and the connection being
  computed, the one prefetched after it, and the LM head (the largest gather);
- the augmenting models whole (colocated) and the hidden states they hand over;
- the composition's weights, gradients and AdamW state, partitioned by ZeRO-3, plus DeepSpeed's
  gradient-reduction bucket;
- activations kept for backward. The bases are frozen, so a frozen linear layer keeps nothing; what
  remains per anchor layer above the lowest connection is the two RMSNorm inputs, attention's q, k, v
  and output, and the MLP's gate, up and SiLU output. With activation checkpointing a layer keeps only
  its input, and backward recomputes one layer at a time;
- logits and their loss: the logits, the fp32 copy the loss takes, and log-softmax's output; past
  LOSS_CHUNK_LOGITS, the logits, their gradient and one chunk's fp32 copies (the loss is taken in chunks);
  with keep_anchor rows, also the anchor alone's logits and the fp32 log-softmax the KL takes of them;
- DeepSpeed's engine and the kernels' scratch, a measured constant; on CPU workers (gloo) also the
  all-gather staging copies;
- a stated runtime allowance: what the process holds before any model (CUDA context and
  communication buffers on a GPU; interpreter, torch, DeepSpeed and Ray on a CPU), plus allocator
  fragmentation as a share of everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
# What a GPU worker holds before any tensor: CUDA context, cuBLAS and NCCL workspaces.
GPU_RUNTIME = int(1.5 * GIB)
# A CPU worker: interpreter, torch, DeepSpeed, a Ray worker and its gloo group (bench/plan_accuracy.py
# measures this baseline on each run).
CPU_RUNTIME = int(0.7 * GIB)
# Caching-allocator fragmentation on a GPU, as a share of the tensors' bytes.
GPU_FRAGMENTATION = 0.05
# Memory a worker takes once it trains, whatever the model: DeepSpeed's engine (its buffers and
# hooks), autograd's and the kernels' scratch. On a CPU worker measured by bench/plan_accuracy.py
# (55-65 MiB after the engine is built, 20-30 MiB more after the first step).
ENGINE_WORKSPACE = {"gpu": 256 * 2**20, "cpu": 96 * 2**20}
# An augmenting worker's exchange buffers and forward scratch (CPU: measured as above).
EXCHANGE_WORKSPACE = {"gpu": 128 * 2**20, "cpu": 24 * 2**20}
# calm_dist.model.objectives.CHUNK_LOGITS (tests/test_plan.py checks they agree): above it the loss is
# taken in checkpointed chunks of positions.
LOSS_CHUNK_LOGITS = 1 << 26
# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py).
PERSISTENCE_THRESHOLD = 100_000
REDUCE_BUCKET_SIZE = 500_000_000
PREFETCH_BUCKET_SIZE = 50_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in one decoder model."""

    parameters: int
    tensor_sizes: tuple[int, ...]  # elements of every parameter tensor
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_width: int  # key (= value) width: kv heads x head width
    vocab: int
    layer_parameters: int  # one decoder layer
    lm_head: int  # elements of the output embedding
    dtype_bytes: int
    tied: bool = False  # the output embedding is the input embedding

    @property
    def bytes(self) -> int:
        return self.parameters * self.dtype_bytes

    def resident_bytes(self, gpu: bool) -> int:
        """An augmenting model's bytes in memory. Only its backbone runs; on a CPU its weights are
        mapped from the safetensors file, so an untied LM head is never read and never resident."""
        unread = 0 if gpu or self.tied else self.lm_head
        return (self.parameters - unread) * self.dtype_bytes


@dataclass(frozen=True)
class TrainSetup:
    anchor: ModelShape
    augmenting: tuple[ModelShape, ...]
    connections: tuple[tuple[int, int, int], ...]  # (augmenting model, its layer, anchor layer)
    connection_parameters: tuple[int, ...]  # per connection, in `connections` order
    composition_tensor_sizes: tuple[int, ...]
    composition_bytes: int  # bytes per composition element
    anchor_workers: int
    augmenting_workers: int  # pipelined only
    pipelined: bool
    prefetch: int
    micro_batch: int
    sequence: int
    global_batch: int
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    zero_stage: int = 3
    persistence_threshold: int = PERSISTENCE_THRESHOLD
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE
    prefetch_bucket_size: int = PREFETCH_BUCKET_SIZE
    max_live_parameters: int = MAX_LIVE_PARAMETERS
    gpu: bool = True  # False: a CPU worker, where untouched pages of a buffer cost nothing
    keep_anchor: bool = False  # rows trained to the anchor alone's distribution (data.keep_anchor_field)

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.anchor_workers)

    @property
    def composition_parameters(self) -> int:
        return sum(self.connection_parameters)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.sequence


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class WorkerPlan:
    role: str  # "anchor worker" or "augmenting worker"
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def term(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)


# --------------------------------------------------------------------------------------------------
# Training


def _partitioned(sizes: tuple[int, ...], ranks: int, threshold: int, stage: int) -> int:
    """Elements a rank holds of these tensors under ZeRO-3: small ones whole, others 1/ranks."""
    if stage < 3:
        return sum(sizes)
    return sum(n if n <= threshold else math.ceil(n / ranks) for n in sizes)


def layer_activations(shape: ModelShape, tokens: int) -> int:
    """Bytes one frozen decoder layer keeps for backward when gradients flow through it."""
    per_token = 2 * shape.hidden + 2 * shape.hidden + 2 * shape.kv_width + 3 * shape.intermediate
    return tokens * per_token * shape.dtype_bytes + tokens * shape.heads * 4  # + attention's fp32 logsumexp


def layer_recompute(shape: ModelShape, tokens: int) -> int:
    """Bytes of one layer re-run in backward under checkpointing: its activations and their gradients."""
    return 2 * layer_activations(shape, tokens)


def cross_attention_activations(setup: TrainSetup, aug_width: int, grad_in: bool) -> int:
    """One connection's saved tensors: the normalised augmenting states and projected keys and values,
    the query's RMSNorm input (when gradients reach it) and output, attention output and its reshaped
    copy. In the composition dtype."""
    width = setup.anchor.hidden
    per_token = aug_width + 2 * width + (width if grad_in else 0) + 2 * width + 2 * width
    return setup.tokens * per_token * setup.composition_bytes


def anchor_terms(setup: TrainSetup) -> list[Term]:
    a, n, t = setup.anchor, setup.anchor_workers, setup.tokens
    stage, threshold = setup.zero_stage, setup.persistence_threshold
    terms: list[Term] = []

    held = _partitioned(a.tensor_sizes, n, threshold, stage) * a.dtype_bytes
    whole = sum(s for s in a.tensor_sizes if s <= threshold) * a.dtype_bytes if stage == 3 else held
    if setup.offload_params:
        terms.append(Term("anchor weights (ZeRO-3 partition)", whole,
                          f"offloaded to host memory except {whole / GIB:.2f} GiB of small persistent tensors"))
    else:
        terms.append(Term("anchor weights (ZeRO-3 partition)", held,
                          f"{a.bytes / GIB:.1f} GiB / {n} ranks" + (", small tensors whole" if stage == 3 else "")))

    if stage == 3 and n > 1:
        # During a step DeepSpeed keeps gathered parameters whole until max_live_parameters elements
        # are live (and fetches prefetch_bucket_size ahead), so this is the whole non-persistent model
        # when it is small, and a few layers plus the LM head when it is large. One rank gathers nothing.
        big_anchor = sum(s for s in a.tensor_sizes if s > threshold)
        big_composition = sum(s for s in setup.composition_tensor_sizes if s > threshold)
        budget = setup.max_live_parameters + setup.prefetch_bucket_size
        anchor_elements = min(big_anchor, max(budget, a.layer_parameters + a.lm_head))
        composition_elements = min(big_composition, max(0, budget - anchor_elements) + max(setup.connection_parameters))
        gathered = anchor_elements * a.dtype_bytes + composition_elements * setup.composition_bytes
        whole = anchor_elements == big_anchor
        terms.append(Term("ZeRO-3 gathered working set", gathered,
                          "every large tensor gathered whole (the model is under stage3_max_live_parameters)" if whole
                          else f"{anchor_elements:,} anchor elements live (stage3_max_live_parameters + prefetch)"))
        if not setup.gpu:
            # gloo all-gathers into a flat staging tensor and copies out when done: the gathers in
            # flight (prefetch_bucket_size ahead) exist twice. NCCL gathers in place.
            staging = min(setup.prefetch_bucket_size, anchor_elements) * a.dtype_bytes
            terms.append(Term("gloo all-gather staging", staging, "prefetched gathers in flight, held twice on CPU"))

    if setup.pipelined:
        received = (setup.prefetch + 1) * sum(
            t * setup.augmenting[k].hidden * setup.augmenting[k].dtype_bytes for k, _ in _state_keys(setup))
        terms.append(Term("augmenting states received", received,
                          f"{setup.prefetch + 1} micro-batches in flight (placement.prefetch + 1)"))
    else:
        aug_bytes = sum(m.resident_bytes(setup.gpu) for m in setup.augmenting)
        terms.append(Term("augmenting models (a copy per worker)", aug_bytes, "colocated: frozen, no gradients"
                          + ("" if setup.gpu else "; LM head unread (weights mapped from the file)")))
        terms.append(Term("augmenting forward (states kept, no autograd)", _augmenting_forward(setup), ""))

    p_c, c = setup.composition_parameters, setup.composition_bytes
    c_sizes = setup.composition_tensor_sizes
    c_held = _partitioned(c_sizes, n, threshold, stage)
    c_part = _partitioned(c_sizes, n, 0, stage)  # gradients and optimizer state are always partitioned
    state = c_held * c + c_part * 4  # weights, fp32 gradient partition
    adam = c_part * 2 * c
    if setup.offload_optimizer:
        terms.append(Term("composition weights, gradients, optimizer state", c_held * c,
                          "gradients and AdamW state offloaded to host memory"))
    else:
        terms.append(Term("composition weights, gradients, optimizer state", state + adam,
                          f"{p_c:,} parameters: weights + fp32 gradients + AdamW m, v, 1/{n} each"))
        bucket = setup.reduce_bucket_size if setup.gpu else min(setup.reduce_bucket_size, p_c)
        terms.append(Term("gradient reduction bucket", bucket * 4,
                          "DeepSpeed's reduce_bucket_size in fp32" + ("" if setup.gpu else ", the pages used")))

    # The export at the end gathers the composition one tensor at a time into rank 0's host memory: on a
    # GPU one gathered tensor, on a CPU worker the whole copy (counted on every worker: they are planned
    # alike, and beside the training state the export outlives).
    export = max(c_sizes) * c if setup.gpu else p_c * c
    terms.append(Term("composition export", export, "rank 0, at the end: " + (
        "one composition tensor gathered at a time" if setup.gpu else "a whole copy of the composition")))
    terms.append(Term("activations", anchor_activations(setup),
                      "activation checkpointing: layer inputs + one layer recomputed" if setup.activation_checkpointing
                      else "every anchor layer above the lowest connection, and the cross-attentions"))
    terms.append(logits_and_loss(t, a.vocab, a.dtype_bytes))
    if setup.keep_anchor:
        terms.append(anchor_alone_logits(t, a.vocab, a.dtype_bytes))
    device = "gpu" if setup.gpu else "cpu"
    terms.append(Term("engine and kernel workspace", ENGINE_WORKSPACE[device],
                      "DeepSpeed's engine, autograd and kernel scratch (measured, whatever the model)"))
    return terms


def logits_and_loss(tokens: int, vocab: int, dtype_bytes: int) -> Term:
    """Whole, the loss keeps an fp32 copy of the logits and its log-softmax; in chunks (past
    LOSS_CHUNK_LOGITS) it keeps neither, and the backward pass holds the logits' gradient and one chunk's
    fp32 copy, log-softmax and their gradient."""
    logits = tokens * vocab
    if logits <= LOSS_CHUNK_LOGITS:
        return Term("logits and loss", logits * (dtype_bytes + 4 + 4), f"{tokens:,} tokens x {vocab:,}: logits, fp32 copy, log-softmax")
    return Term("logits and loss", 2 * logits * dtype_bytes + _loss_chunk(vocab) * 3 * 4,
                f"{tokens:,} tokens x {vocab:,}: logits and their gradient, one chunk's fp32 loss")


def _loss_chunk(vocab: int) -> int:
    """Logits in one chunk of the chunked loss: whole positions, at most LOSS_CHUNK_LOGITS."""
    return LOSS_CHUNK_LOGITS // vocab * vocab


def anchor_alone_logits(tokens: int, vocab: int, dtype_bytes: int) -> Term:
    """keep_anchor rows are trained to the anchor alone's distribution: its logits (a second forward pass,
    without the composition) live until the backward pass, and the whole KL keeps their fp32 log-softmax
    (in chunks, one chunk's). Counted for every row: a micro-batch may hold only such rows."""
    logits = tokens * vocab
    kept = 4 * (logits if logits <= LOSS_CHUNK_LOGITS else _loss_chunk(vocab))
    return Term("anchor alone's logits (keep_anchor)", logits * dtype_bytes + kept,
                f"{tokens:,} tokens x {vocab:,}: the KL's target, and its fp32 log-softmax")


def anchor_activations(setup: TrainSetup) -> int:
    a, t = setup.anchor, setup.tokens
    lowest = min(c[2] for c in setup.connections)
    above = a.layers - 1 - lowest  # layers whose input carries a gradient
    by_layer: dict[int, list[int]] = {}
    for k, _, j in setup.connections:
        by_layer.setdefault(j, []).append(setup.augmenting[k].hidden)
    keys_values = sum(t * (w + 2 * a.hidden) * setup.composition_bytes for ws in by_layer.values() for w in ws)
    final_norm = t * a.hidden * a.dtype_bytes
    if setup.activation_checkpointing:
        inputs = above * t * a.hidden * a.dtype_bytes
        widest = max(cross_attention_activations(setup, w, True) for ws in by_layer.values() for w in ws)
        return inputs + keys_values + final_norm + layer_recompute(a, t) + 2 * widest
    cross = sum(cross_attention_activations(setup, w, j != lowest) - t * (w + 2 * a.hidden) * setup.composition_bytes
                for j, ws in by_layer.items() for w in ws)
    return above * layer_activations(a, t) + keys_values + cross + final_norm


def _state_keys(setup: TrainSetup) -> list[tuple[int, int]]:
    return sorted({(k, i) for k, i, _ in setup.connections})


def _augmenting_forward(setup: TrainSetup) -> int:
    """The connected layers' outputs kept until the anchor uses them, plus one layer's scratch."""
    t = setup.tokens
    kept = sum(t * setup.augmenting[k].hidden * setup.augmenting[k].dtype_bytes for k, _ in _state_keys(setup))
    scratch = max(layer_activations(m, t) for m in setup.augmenting)
    return kept + scratch


def augmenting_terms(setup: TrainSetup) -> list[Term]:
    """An augmenting rank of the pipelined placement."""
    t = setup.tokens
    served = -(-setup.anchor_workers // setup.augmenting_workers)
    states = sum(t * setup.augmenting[k].hidden * setup.augmenting[k].dtype_bytes for k, _ in _state_keys(setup))
    return [
        Term("augmenting models", sum(m.resident_bytes(setup.gpu) for m in setup.augmenting),
             "whole, frozen, no gradients" + ("" if setup.gpu else "; LM head unread (weights mapped from the file)")),
        Term("augmenting forward (states kept, no autograd)", _augmenting_forward(setup), ""),
        Term("states in flight to anchor workers", 4 * served * states,
             f"sends to {served} anchor worker(s), at most 4 requests deep"),
        Term("exchange and kernel workspace", EXCHANGE_WORKSPACE["gpu" if setup.gpu else "cpu"],
             "gloo exchange buffers and forward scratch (measured, whatever the model)"),
    ]


def with_runtime(role: str, terms: list[Term], gpu: bool) -> WorkerPlan:
    tensors = sum(t.bytes for t in terms)
    if gpu:
        allowance = GPU_RUNTIME + int(GPU_FRAGMENTATION * tensors)
        note = f"CUDA context and NCCL {GPU_RUNTIME / GIB:.1f} GiB + {GPU_FRAGMENTATION:.0%} allocator fragmentation"
    else:
        allowance, note = CPU_RUNTIME, "interpreter, torch, DeepSpeed, Ray worker (measured by bench/plan_accuracy.py)"
    return WorkerPlan(role, (*terms, Term("runtime allowance", allowance, note)))


def train_plan(setup: TrainSetup) -> list[WorkerPlan]:
    """One WorkerPlan per kind of worker: anchor workers, and augmenting workers when pipelined."""
    plans = [with_runtime("anchor worker", anchor_terms(setup), setup.gpu)]
    if setup.pipelined:
        plans.append(with_runtime("augmenting worker", augmenting_terms(setup), setup.gpu))
    return plans


def peak(setup: TrainSetup) -> int:
    return max(p.total for p in train_plan(setup))
