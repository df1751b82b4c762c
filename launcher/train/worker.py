"""What each Ray Train worker runs: build the ZeRO-3 engine around the composed model, feed it its
data shard, report checkpoints to Ray Train, export the composition at the end."""

from __future__ import annotations

import tempfile
from pathlib import Path

from launcher.composition_layout import connections_for
from launcher.runtime.run_log import RunLog
from launcher.runtime.worker_setup import (
    load_partitioned_model,
    load_tokenizer,
    load_whole,
    model_config,
    own_tokenizers,
    start_worker,
    training_evaluation,
)
from launcher.train_config import TrainConfig


def train_worker(loop_config: dict) -> None:
    config = TrainConfig.model_validate(loop_config["config"])
    device = start_worker(config.ray.use_gpu)
    import deepspeed
    import ray.train
    import torch

    from calm_dist.data.batches import ShardedBatches
    from calm_dist.data.records import DataError, load_records
    from calm_dist.data.tokenization import tokenize_records
    from calm_dist.distributed.checkpoint_layout import STATE
    from calm_dist.distributed.engine import build_engine, deepspeed_config, lr_lambda
    from calm_dist.distributed.lockstep_eval import (
        colocated_decode_states,
        new_cache_for,
        recomputed_decode_states,
    )
    from calm_dist.distributed.placement import AugmentingClient, AugmentingServer, Layout, split_world
    from calm_dist.distributed.train_loop import LoopSettings, run
    from calm_dist.distributed.training_state import (
        export_composition,
        load_training_state,
        save_training_state,
    )
    from calm_dist.model.alignment import views_from_batch
    from calm_dist.model.architectures import dims_from_config
    from calm_dist.model.composed import ComposedModel, augmenting_states

    context = ray.train.get_context()
    rank = context.get_world_rank()
    backend = "nccl" if config.ray.use_gpu else "gloo"
    train = config.training
    pipelined = config.placement.mode == "pipelined"
    layout = Layout(config.ray.num_workers, config.placement.augmenting_workers) if pipelined else None
    world = split_world(layout, backend) if pipelined else None  # anchors get a world of their own
    torch.manual_seed(train.seed)
    data_rank, data_world = rank, config.ray.num_workers  # anchor ranks come first

    aug_configs = [model_config(m) for m in config.models.augmenting]
    anchor_config = model_config(config.models.anchor)
    connections = connections_for(config.composition, anchor_config.num_hidden_layers,
                                  [c.num_hidden_layers for c in aug_configs])

    def load_augmenting():
        return load_whole(config.models.augmenting, device)

    if pipelined and not layout.is_anchor(rank):
        # An augmenting rank: serve hidden states until the anchor ranks stop, and take part in every
        # checkpoint report (Ray Train needs each worker to report equally often).
        server = AugmentingServer(load_augmenting(), connections, layout, world.exchange, device,
                                  on_barrier=lambda: ray.train.report({}))
        server.serve()
        world.close()
        return

    deepspeed.init_distributed(dist_backend=backend)
    ds_config = deepspeed_config(
        micro_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        data_parallel_size=data_world,
        zero_stage=config.deepspeed.zero_stage,
        offload_optimizer=config.deepspeed.offload_optimizer,
        offload_params=config.deepspeed.offload_params,
        grad_clip=train.optimizer.grad_clip,
        extra=config.deepspeed.extra,
    )
    spec = config.models.anchor
    anchor = load_partitioned_model(spec, ds_config)
    if config.deepspeed.activation_checkpointing:
        anchor.activation_checkpointing_enable({"use_reentrant": False})
    tokenizer, pad = load_tokenizer(config.models.tokenizer or spec.path)
    # Augmenting models with a tokenizer of their own read the text (calm_dist.model.alignment).
    aligner, aug_pads = own_tokenizers(tokenizer, [m.tokenizer for m in config.models.augmenting])
    composed = ComposedModel(anchor, [dims_from_config(c) for c in aug_configs], connections,
                             num_heads=config.composition.num_heads, dtype=getattr(torch, config.composition.dtype),
                             aligner=aligner, recency_bias=config.composition.recency_bias,
                             null_attention=config.composition.null_attention,
                             dropout=config.composition.dropout)
    schedule = lr_lambda(train.schedule.kind, train.schedule.warmup_steps, train.steps, train.schedule.min_lr_ratio)
    opt = train.optimizer
    engine, _, _ = build_engine(composed, ds_config, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas,
                                eps=opt.eps, schedule=schedule)

    fields = dict(text_field=config.data.text_field, prompt_field=config.data.prompt_field,
                  completion_field=config.data.completion_field)

    def tokenized(records):
        return tokenize_records(records, tokenizer, max_length=config.data.max_length, aligner=aligner, **fields)

    batches = ShardedBatches(tokenized(load_records(config.data.train, config.data.split)),
                             micro_batch_size=train.micro_batch_size, rank=data_rank, world_size=data_world,
                             seed=train.seed, pad_token_id=pad, augmenting_pad_ids=aug_pads)
    start_step = 0
    # The driver names the newest complete checkpoint on disk; Ray Train may know one too (restored from
    # its snapshot, or kept across a restart it made itself). The higher step wins: Ray's snapshot can lag.
    resume_from = loop_config.get("resume_from")
    checkpoint = _newest(ray.train.get_checkpoint(), ray.train.Checkpoint(resume_from) if resume_from else None)
    if checkpoint:
        with checkpoint.as_directory() as directory:
            start_step, data_state = load_training_state(engine, directory)
        try:
            batches.load_state_dict(data_state)
        except DataError as err:  # resumed with other data or batch sizes: the user's to fix
            raise DataError(f"{checkpoint.path}/{STATE}: {err}") from None

    def on_device(iterator):
        for batch in iterator:
            yield {k: v.to(device) for k, v in batch.items()}

    if pipelined:
        client = AugmentingClient(layout, world.exchange, connections, [c.hidden_size for c in aug_configs],
                                  [getattr(torch, m.dtype) for m in config.models.augmenting], device,
                                  config.placement.prefetch)
        states_for = client.states_for
        decode_states = recomputed_decode_states(states_for)
        augmenting = []
    else:
        augmenting = load_augmenting()

        def states_for(batch):
            return augmenting_states(augmenting, connections, batch["input_ids"], batch["attention_mask"],
                                     views=views_from_batch(batch))

        decode_states = colocated_decode_states(augmenting, connections)

    evaluate = None
    if config.data.eval and train.eval_every:
        eval_records = load_records(config.data.eval, config.data.split)
        evaluate = training_evaluation(config, engine, tokenizer, eval_records, tokenized(eval_records), states_for,
                                       decode_states, lambda: new_cache_for(composed, augmenting), device, pad,
                                       data_rank, data_world, aug_pads)

    run_dir = Path(config.output_dir) / config.name
    board = ray.get_actor(loop_config["board"]) if loop_config.get("board") else None
    run_log = RunLog(run_dir, start_step, board) if rank == 0 else None

    def on_log(step, metrics):
        if run_log is not None:
            run_log.log(step, metrics)

    def on_checkpoint(step):
        if pipelined:
            client.barrier()  # the augmenting ranks report alongside
        data_state = client.consumed_data_state if pipelined else batches.state_dict()
        with tempfile.TemporaryDirectory() as directory:
            save_training_state(engine, directory, step, data_state)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(directory))

    settings = LoopSettings(train.steps, config.gradient_accumulation_steps, train.log_every,
                            train.eval_every, train.checkpoint_every)
    stream = on_device(iter(batches))
    if pipelined:
        stream = client.prefetched(stream, batches.state_dict)
    if start_step < train.steps:
        run(engine, stream, states_for, settings, start_step, on_log, on_checkpoint, evaluate)
    if pipelined:
        client.stop()
    export_composition(composed, run_dir / "composition", extra={"trained_steps": train.steps, "run": config.name},
                       augmenting_sources=[m.path for m in config.models.augmenting])
    if run_log is not None:
        run_log.close()
    if pipelined:
        world.close()  # Ray Train destroys the default group itself, never this one


def _newest(*checkpoints):
    """The checkpoint saved at the highest step among those given (None entries skipped)."""
    from calm_dist.distributed.checkpoint_layout import checkpoint_step

    def step(checkpoint) -> int:
        with checkpoint.as_directory() as directory:
            return checkpoint_step(directory)

    return max((c for c in checkpoints if c is not None), key=step, default=None)


