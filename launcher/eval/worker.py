"""What each Ray Train worker of `calm eval` runs: the model to score under DeepSpeed ZeRO-3 (the
composition on its base models, or one base model alone), its share of the data, and the metrics
reported back to the driver."""

from __future__ import annotations

from launcher.eval.command import EvalJob
from launcher.runtime.worker_setup import (
    load_partitioned_model,
    load_tokenizer,
    load_whole,
    own_tokenizers,
    start_worker,
)


def eval_worker(loop_config: dict) -> None:
    job = EvalJob.model_validate(loop_config["job"])
    device = start_worker(job.use_gpu)
    import deepspeed
    import ray.train
    import torch
    from safetensors.torch import load_file

    from calm_dist.data.records import load_records
    from calm_dist.data.tokenization import tokenize_records
    from calm_dist.distributed.engine import deepspeed_config
    from calm_dist.distributed.lockstep_eval import (
        SingleModel,
        colocated_decode_states,
        eval_share,
        evaluate,
        new_cache_for,
    )
    from calm_dist.model.alignment import views_from_batch
    from calm_dist.model.architectures import dims_from_config
    from calm_dist.model.composed import ComposedModel, augmenting_states
    from calm_dist.model.composition_checkpoint import WEIGHTS, read_manifest
    from calm_dist.model.connections import Connection

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    deepspeed.init_distributed(dist_backend="nccl" if job.use_gpu else "gloo")
    ds_config = deepspeed_config(micro_batch_size=job.micro_batch_size, gradient_accumulation_steps=1,
                                 data_parallel_size=world, zero_stage=job.zero_stage)
    tokenizer, pad = load_tokenizer(job.tokenizer)
    aligner, aug_pads = None, []

    if job.model == "composition":
        # Augmenting models with a tokenizer of their own read the text (checked on the driver).
        aligner, aug_pads = own_tokenizers(tokenizer, [m.tokenizer for m in job.augmenting])
        manifest = read_manifest(job.composition)
        connections = [Connection(**c) for c in manifest["connections"]]
        augmenting = load_whole(job.augmenting, device)
        model = ComposedModel(load_partitioned_model(job.anchor, ds_config),
                              [dims_from_config(m.config) for m in augmenting], connections,
                              num_heads=manifest["num_heads"], dtype=getattr(torch, manifest["dtype"]),
                              recency_bias=manifest.get("recency_bias", False),
                              null_attention=manifest.get("null_attention", False), aligner=aligner)
        # θ_C goes in while the composition is still whole; DeepSpeed partitions it below.
        model.composition.load_state_dict(load_file(f"{job.composition}/{WEIGHTS}"))
        model.composition.requires_grad_(False)

        def states_for(batch):
            return augmenting_states(augmenting, connections, batch["input_ids"], batch["attention_mask"],
                                     views=views_from_batch(batch))

        decode_states = colocated_decode_states(augmenting, connections)
    else:
        spec = job.anchor if job.model == "anchor" else job.augmenting[job.augmenting_index]
        model, augmenting, states_for, decode_states = SingleModel(load_partitioned_model(spec, ds_config)), [], None, None
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()

    board = ray.get_actor(loop_config["board"]) if rank == 0 and loop_config.get("board") else None
    done_before = 0  # micro-batches of the files already scored, so progress runs on across files
    per_file = []
    for file in job.data:
        records = load_records(file, job.split)
        if job.samples is not None:
            records = records.select(range(min(job.samples, len(records))))
        tokenized = tokenize_records(records, tokenizer, max_length=job.max_length, text_field=job.text_field, aligner=aligner,
                                     prompt_field=job.prompt_field, completion_field=job.completion_field)
        share = eval_share(records, tokenized, tokenizer, micro_batch_size=job.micro_batch_size, rank=rank,
                           world_size=world, pad_token_id=pad, prompt_field=job.prompt_field,
                           completion_field=job.completion_field, augmenting_pad_ids=aug_pads)

        def on_progress(done: int, before: int = done_before) -> None:
            if board is not None:
                board.advance.remote(before + done)

        metrics = evaluate(engine, share, decode=tokenizer.decode, states_for=states_for,
                           decode_states=decode_states, new_cache=lambda: new_cache_for(model, augmenting),
                           max_new_tokens=job.max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                           device=device, on_progress=on_progress, examples=job.examples if rank == 0 else 0)
        metrics["eval_micro_batches"] = len(share.loss_batches) + len(share.prompt_batches)
        done_before += metrics["eval_micro_batches"]
        per_file.append(metrics)
    if board is not None:  # Ray Train keeps only metrics that come with a checkpoint
        ray.get(board.set_result.remote(per_file))
    ray.train.report({})  # every worker reports, the same number of times
