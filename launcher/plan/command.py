"""`calm plan CONFIG`: will it fit? Memory per worker of a training or merge config.

From the model configs alone (no weights are read), against the device memory, and what would make
it fit. A merge is planned from its inputs' safetensors headers, or from their configs where the
weights are not on disk yet (merge.planning.config_only), and says which.

The arithmetic lives in calm_dist.distributed.memory_plan (training) and merge.planning.memory (merges);
this module reads the configs, builds each model on the meta device to count its tensors exactly, and
prints the table. `calm train` calls check_fits() in its preflight and refuses a run that cannot fit.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from calm_dist.distributed.fit_suggestions import fit_suggestions
from calm_dist.distributed.memory_plan import GIB, ModelShape, TrainSetup, WorkerPlan, train_plan
from launcher.train_config import ConfigError, TrainConfig
from merge.planning.memory import MergeSetup, loss_terms, merge_seconds, merge_terms

USER_ERRORS = (ConfigError,)
# Bytes per element of the torch dtype names a training config gives (models.*.dtype, composition.dtype);
# safetensors dtype codes are merge.io.safetensors_file.ITEMSIZE's.
TORCH_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a training config or a merge config (YAML)")
    parser.add_argument("--device-memory", metavar="SIZE",
                        help="memory of each worker's device, e.g. 80GB (default: ray.device_memory, else this "
                             "machine's GPU when the config uses GPUs)")
    parser.add_argument("--disk-speed", metavar="SIZE",
                        help="merge configs: disk bytes per second, e.g. 500MB (default: measured on the first input)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as in calm train")


def parse_size(text: str, key: str) -> int:
    """'80GB', '1.5GiB', '500MB' -> bytes; ConfigError naming `key` otherwise."""
    cleaned = str(text).strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        if unit not in UNITS:
            raise ValueError(unit)
        return int(float(number) * UNITS[unit])
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a size such as 80GB or 1.5GiB") from None


def gib(value: int) -> str:
    return f"{value / GIB:8.2f} GiB"


# --------------------------------------------------------------------------------------------------
# Training configs


def model_shape(path: str, dtype: str, trust_remote_code: bool = False) -> ModelShape:
    """Exact tensor sizes of a model, built from its config on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from calm_dist.model.architectures import decoder_layers

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    sizes = tuple(p.numel() for p in model.parameters())
    layer = decoder_layers(model)[0]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head = model.get_output_embeddings()
    return ModelShape(
        parameters=sum(sizes), tensor_sizes=sizes, layers=len(decoder_layers(model)), hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size, heads=heads,
        kv_width=kv_heads * head_dim, vocab=config.vocab_size,
        layer_parameters=sum(p.numel() for p in layer.parameters()),
        lm_head=head.weight.numel() if head is not None else 0, dtype_bytes=TORCH_DTYPE_BYTES[dtype],
        tied=head is not None and head.weight is model.get_input_embeddings().weight,
    )


def train_setup(config: TrainConfig, gpu: bool | None = None) -> TrainSetup:
    from calm_dist.model.cross_attention import CrossAttention

    anchor = model_shape(config.models.anchor.path, config.models.anchor.dtype, config.models.anchor.trust_remote_code)
    augmenting = tuple(model_shape(m.path, m.dtype, m.trust_remote_code) for m in config.models.augmenting)
    connections = sorted(config.composition.layout(anchor.layers, [m.layers for m in augmenting]))
    width = anchor.hidden
    heads = config.composition.num_heads or anchor.heads
    sizes: list[int] = []
    per_connection = []
    for c in connections:
        aug = augmenting[c.augmenting].hidden
        # f_proj weight and bias, keys+values, q, out: the tensors of calm_dist.model.cross_attention.
        sizes += [width * aug, width, 2 * width * width, width * width, width * width]
        if config.composition.recency_bias:
            sizes.append(heads)
        per_connection.append(CrossAttention.parameter_count(aug, width, heads, config.composition.recency_bias))
    zero = config.deepspeed.extra.get("zero_optimization", {})
    return TrainSetup(
        anchor=anchor, augmenting=augmenting,
        connections=tuple((c.augmenting, c.aug_layer, c.anchor_layer) for c in connections),
        connection_parameters=tuple(per_connection), composition_tensor_sizes=tuple(sizes),
        composition_bytes=TORCH_DTYPE_BYTES[config.composition.dtype],
        anchor_workers=config.ray.num_workers, augmenting_workers=config.placement.augmenting_workers,
        pipelined=config.placement.mode == "pipelined", prefetch=config.placement.prefetch,
        micro_batch=config.training.micro_batch_size, sequence=config.data.max_length,
        global_batch=config.training.global_batch_size,
        activation_checkpointing=config.deepspeed.activation_checkpointing,
        offload_optimizer=config.deepspeed.offload_optimizer, offload_params=config.deepspeed.offload_params,
        zero_stage=config.deepspeed.zero_stage,
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
        prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        max_live_parameters=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
        gpu=config.ray.use_gpu if gpu is None else gpu, keep_anchor=config.data.keep_anchor_field is not None,
    )


def device_memory(config: TrainConfig, given: str | None) -> tuple[int | None, str]:
    """Bytes per worker device and where the figure comes from; None when nothing says."""
    if given:
        return parse_size(given, "--device-memory"), "--device-memory"
    if config.ray.device_memory:
        return parse_size(config.ray.device_memory, "ray.device_memory"), "ray.device_memory"
    if config.ray.use_gpu:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, f"this machine's {torch.cuda.get_device_name(0)}"
    return None, ""


def describe_train(setup: TrainSetup, plans: list[WorkerPlan], memory: int | None, source: str) -> str:
    width = max(len(t.name) for p in plans for t in p.terms)
    lines = [f"per worker, {setup.anchor_workers} anchor worker(s)"
             + (f" + {setup.augmenting_workers} augmenting worker(s) (pipelined)" if setup.pipelined else " (colocated)")
             + f", micro batch {setup.micro_batch} x {setup.sequence} tokens"
             + (", activation checkpointing" if setup.activation_checkpointing else "") + ":"]
    for plan in plans:
        lines.append(f"  {plan.role}")
        for term in plan.terms:
            lines.append(f"    {term.name:<{width}} {gib(term.bytes)}" + (f"   {term.note}" if term.note else ""))
        verdict = ""
        if memory is not None:
            verdict = (f"   fits in {memory / GIB:.1f} GiB ({source}), {(memory - plan.total) / GIB:.1f} GiB spare"
                       if plan.total <= memory else f"   does NOT fit in {memory / GIB:.1f} GiB ({source})")
        lines.append(f"    {'total':<{width}} {gib(plan.total)}{verdict}")
    if memory is None:
        lines.append("device memory unknown: give --device-memory 80GB (or ray.device_memory) to check the fit")
    elif max(p.total for p in plans) > memory:
        suggestions = fit_suggestions(setup, memory)
        if suggestions:
            lines.append("changes that lower the peak (new largest total per worker):")
            for s in suggestions:
                lines.append(f"  {s.change:<70} {gib(s.total)}  {'fits' if s.fits else 'still too large'}")
    return "\n".join(lines)


def check_fits(config: TrainConfig) -> None:
    """Preflight: ConfigError naming the largest term when a known device memory is too small."""
    memory, source = device_memory(config, None)
    if memory is None:
        return
    setup = train_setup(config)
    for plan in train_plan(setup):
        if plan.total > memory:
            largest = plan.largest
            raise ConfigError(
                f"{'ray.num_workers' if plan.role == 'anchor worker' else 'placement.augmenting_workers'}: an "
                f"{plan.role} needs {plan.total / GIB:.1f} GiB, more than the {memory / GIB:.1f} GiB of its device "
                f"({source}); the largest part is {largest.name}, {largest.bytes / GIB:.1f} GiB. "
                "`calm plan CONFIG --device-memory SIZE` lists changes that make it fit"
            )


# --------------------------------------------------------------------------------------------------
# Merge configs


def merge_setup(cfg, inputs: list | None = None) -> tuple[MergeSetup, list]:
    """The merge's plan from its inputs (merge.planning.config_only.plan_inputs: the weights' headers,
    or the models' configs where the weights are not on disk yet)."""
    from merge.io.reader import reading_order, slot_bytes
    from merge.io.safetensors_file import ITEMSIZE
    from merge.methods.specs import BLOCK
    from merge.planning.config_only import plan_inputs
    from merge.planning.inputs import match_tensors
    from merge.planning.plan import (
        OUT_BUFFERS,
        WORKER_OVERHEAD,
        build_tasks,
        default_weights,
        largest_held_masks,
        largest_remap,
        plan_tensors,
    )
    from merge.planning.slices import plan_slices

    checkpoints = [i.checkpoint for i in (plan_inputs(cfg) if inputs is None else inputs)]
    vocab = None
    if cfg.tokenizer:
        from merge.merge_errors import CheckpointError
        from merge.planning.vocab import plan_vocabulary, rows_bound

        try:
            vocab = plan_vocabulary(cfg, checkpoints).rows
        except CheckpointError:  # tokenizers not downloaded yet: size the memory by the largest vocabulary
            vocab = rows_bound(cfg, checkpoints)
    if cfg.slices is not None:  # passthrough: copies of the tensors its slices name
        tensors = list(plan_slices(cfg, checkpoints).tensors)
    else:
        layout = match_tensors(checkpoints, cfg.vocab_policy, cfg.drop, vocab)
        weights = default_weights(cfg) or [1.0] * len(cfg.models)
        if cfg.weights_from_examples:
            weights = [1.0 / len(cfg.models)] * len(cfg.models)
        tensors = plan_tensors(cfg, layout, weights)
    tasks = build_tasks(cfg, tensors)
    spec = cfg.weights_from_examples
    input_bytes = [sum(info.nbytes for info in c.tensors.values()) for c in checkpoints]
    vocab_size = max((c.vocab_size or 0) for c in checkpoints)
    return MergeSetup(
        inputs=len(checkpoints), input_bytes=max(input_bytes), output_bytes=sum(t.nbytes for t in tensors),
        largest_input_itemsize=max(ITEMSIZE[s.dtype] for t in tensors for s in t.sources),
        output_itemsize=max(ITEMSIZE[t.dtype] for t in tensors), chunk_elements=tasks[0].chunk_elems,
        read_slots=tasks[0].read_slots,
        read_bytes=sum(slot_bytes(c.sources, c.stop - c.start) for c in reading_order(tasks)),
        largest_tensor=max(t.numel for t in tensors),
        block=BLOCK, out_buffers=OUT_BUFFERS, worker_runtime=WORKER_OVERHEAD, workers=cfg.workers,
        max_shard_bytes=int(cfg.output.max_shard_size),
        loss_model_bytes=max(input_bytes) if spec else 0,
        loss_workers=spec.workers if spec else 1,
        loss_tokens=spec.batch_size * spec.max_length if spec else 0, vocab=vocab_size, method=cfg.method,
        remap_bytes=largest_remap(tensors), held_mask_bytes=largest_held_masks(tensors),
        tensor_sources=1 if cfg.slices is not None else 0,
        sliced_read_bytes=sum(s.nbytes for t in tensors for s in t.sources) if cfg.slices is not None else 0,
    ), tasks


def measure_read_speed(path: Path, limit: int = 256 * 2**20) -> float:
    """Bytes per second of a sequential read of up to `limit` bytes, the file's cached pages dropped first."""
    with path.open("rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buffer, done, start = bytearray(16 * 2**20), 0, time.perf_counter()
        while done < limit and (got := f.readinto(buffer)):
            done += got
    return done / max(time.perf_counter() - start, 1e-6)


def describe_merge(cfg, setup: MergeSetup, tasks: list, disk_speed: str | None, inputs: list = ()) -> str:
    plans = [merge_terms(setup)]
    if cfg.weights_from_examples:
        plans.append(loss_terms(setup))
    width = max(len(t.name) for p in plans for t in p.terms)
    lines = []
    from_configs = [i for i in inputs if i.from_config]
    if from_configs:
        lines.append(f"planned from configs only for {len(from_configs)} of {len(inputs)} models: the merge needs their "
                     "weights on disk, and reads their headers then")
        lines += [f"  {i.checkpoint.name}: {i.from_config}" for i in from_configs]
    lines.append(f"merge of {setup.inputs} models, {setup.workers} worker(s), {len(tasks)} output shard(s):")
    for plan in plans:
        lines.append(f"  {plan.role}" + (" (weights from examples, before the merge)" if plan.role == "loss worker"
                                          else " (peak anonymous memory)"))
        for term in plan.terms:
            lines.append(f"    {term.name:<{width}} {gib(term.bytes)}   {term.note}")
        lines.append(f"    {'total':<{width}} {gib(plan.total)}"
                     + (f"   x {setup.workers} workers = {plan.total * setup.workers / GIB:.2f} GiB"
                        if plan.role == "merge worker" and setup.workers > 1 else ""))
    lines.append(f"disk: read {setup.total_read_bytes / GIB:.2f} GiB, write {setup.output_bytes / GIB:.2f} GiB "
                 f"to {cfg.output.path} (shards written under temporary names, renamed when complete: no extra space)")
    if cfg.weights_from_examples and cfg.weights_from_examples.offload_folder:
        lines.append(f"  offload folder {cfg.weights_from_examples.offload_folder}: up to "
                     f"{setup.loss_model_bytes / GIB:.2f} GiB (one candidate)")
    if disk_speed:
        speed, how = parse_size(disk_speed, "--disk-speed"), "given"
    else:
        on_disk = sorted({Path(s.path) for t in tasks for ten in t.tensors for s in ten.sources if Path(s.path).is_file()})
        if not on_disk:
            lines.append("time: no input is on disk to measure the disk's speed on; give --disk-speed (e.g. 500MB)")
            return "\n".join(lines)
        speed, how = measure_read_speed(on_disk[0]), f"measured on {on_disk[0].name}"
    seconds = merge_seconds(setup, speed, speed)
    lines.append(f"time: ~{seconds:.0f} s at {speed / 1e6:.0f} MB/s ({how}); the merge runs near the disk's speed "
                 "(0.7-1.2x in bench/merge_throughput.py)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def _check_model_folder(path: str, key: str) -> None:
    """The plan needs only config.json: weights may live on a cluster this machine never sees."""
    from calm_dist.model.architectures import DECODER_LAYERS

    config = Path(path) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{key}: {path} has no config.json (the plan reads only the model's config)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}: {config} cannot be read: {err}") from None
    if model_type not in DECODER_LAYERS:
        raise ConfigError(f"{key}: {path} is a {model_type!r} model, not a supported architecture "
                          f"(supported: {', '.join(sorted(DECODER_LAYERS))})")


def is_merge_config(path: str) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_config below reports it
    return isinstance(raw, dict) and "method" in raw and "output" in raw


def run(args: argparse.Namespace) -> int:
    from launcher.train_config import parse_overrides

    overrides = parse_overrides(args.set)
    if is_merge_config(args.config):
        from merge.merge_config import load_config as load_merge_config
        from merge.merge_errors import MergeError
        from merge.planning.config_only import plan_inputs

        try:
            cfg = load_merge_config(args.config, overrides)
            inputs = plan_inputs(cfg)
            setup, tasks = merge_setup(cfg, inputs)
        except MergeError as err:
            raise ConfigError(str(err)) from None
        print(describe_merge(cfg, setup, tasks, args.disk_speed, inputs))
        return 0
    from launcher.train_config import load_config

    config = load_config(args.config, overrides)
    _check_model_folder(config.models.anchor.path, "models.anchor.path")
    for k, spec in enumerate(config.models.augmenting):
        _check_model_folder(spec.path, f"models.augmenting.{k}.path")
    memory, source = device_memory(config, args.device_memory)
    setup = train_setup(config)
    plans = train_plan(setup)
    print(describe_train(setup, plans, memory, source))
    return 1 if memory is not None and max(p.total for p in plans) > memory else 0
