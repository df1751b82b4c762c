"""What each Ray Train worker of `calm eval` runs: the model to score under DeepSpeed ZeRO-3 (the
composition on its base models, or one base model alone), then either its share of the data and the
metrics reported back to the driver (eval_worker), or lm-evaluation-harness tasks (harness_worker)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.eval.job import EvalJob
from launcher.runtime.worker_setup import start_worker


@dataclass
class Loaded:
    """The model a worker scores, as both kinds of evaluation use it."""

    engine: object  # the DeepSpeed engine around `model`
    model: object  # ComposedModel (augmenting models outside) or SingleModel
    augmenting: list  # the augmenting models, whole, beside the model
    tokenizer: object
    pad: int
    states_for: Callable | None
    decode_states: Callable | None
    aligner: object = None
    aug_pads: list[int] = field(default_factory=list)


def load_model(job: EvalJob, device, world: int) -> Loaded:
    from calm_dist.distributed.base_models import load_anchor, load_tokenizer, load_whole, own_tokenizers
    from calm_dist.distributed.engine import deepspeed_config, inference_engine, init_process_group
    from calm_dist.distributed.placement import Colocated
    from calm_dist.model.architectures import model_dims
    from calm_dist.model.composition_checkpoint import load_composition
    from calm_dist.model.decoding import SingleModel

    init_process_group(job.use_gpu)
    ds_config = deepspeed_config(micro_batch_size=job.micro_batch_size, gradient_accumulation_steps=1,
                                 data_parallel_size=world, zero_stage=job.zero_stage)
    tokenizer, pad = load_tokenizer(job.tokenizer)
    aligner, aug_pads = None, []
    if job.model == "composition":
        # Augmenting models with a tokenizer of their own read the text (checked on the driver).
        aligner, aug_pads = own_tokenizers(tokenizer, [m.tokenizer for m in job.augmenting])
        augmenting = load_whole(job.augmenting, device)
        tokenizers = [tokenizer, *aligner.augmenting] if aligner is not None else None
        # The augmenting models run beside the composed model (ZeRO-3 would partition them inside it);
        # θ_C goes in while the composition is still whole, and DeepSpeed partitions it below.
        model = load_composition(job.composition, load_anchor(job.anchor, ds_config, device),
                                 [model_dims(m) for m in augmenting], tokenizers)
        model.composition.requires_grad_(False)
        beside = Colocated(augmenting, model.connections)
        states_for, decode_states = beside.states_for, beside.decode_states
    else:
        spec = job.anchor if job.model == "anchor" else job.augmenting[job.augmenting_index]
        model, augmenting, states_for, decode_states = SingleModel(load_anchor(spec, ds_config, device)), [], None, None
    return Loaded(inference_engine(model, ds_config), model, augmenting, tokenizer, pad, states_for, decode_states,
                  aligner, aug_pads)


def eval_worker(loop_config: dict) -> None:
    job = EvalJob.model_validate(loop_config["job"])
    device = start_worker(job.use_gpu)
    import ray.train

    from calm_dist.data.records import load_records
    from calm_dist.data.tokenization import tokenize_records
    from calm_dist.distributed.lockstep_eval import eval_share, evaluate, new_cache_for

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    loaded = load_model(job, device, world)
    tokenizer, pad, model, augmenting = loaded.tokenizer, loaded.pad, loaded.model, loaded.augmenting

    board = ray.get_actor(loop_config["board"]) if rank == 0 and loop_config.get("board") else None
    done_before = 0  # micro-batches of the files already scored, so progress runs on across files
    per_file = []
    for file in job.data:
        records = load_records(file, job.split)
        if job.samples is not None:
            records = records.select(range(min(job.samples, len(records))))
        tokenized = tokenize_records(records, tokenizer, max_length=job.max_length, text_field=job.text_field,
                                     aligner=loaded.aligner, prompt_field=job.prompt_field,
                                     completion_field=job.completion_field)
        share = eval_share(records, tokenized, tokenizer, micro_batch_size=job.micro_batch_size, rank=rank,
                           world_size=world, pad_token_id=pad, prompt_field=job.prompt_field,
                           completion_field=job.completion_field, augmenting_pad_ids=loaded.aug_pads)

        def on_progress(done: int, before: int = done_before) -> None:
            if board is not None:
                board.advance.remote(before + done)

        metrics = evaluate(loaded.engine, share, decode=tokenizer.decode, states_for=loaded.states_for,
                           decode_states=loaded.decode_states, new_cache=lambda: new_cache_for(model, augmenting),
                           max_new_tokens=job.max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                           device=device, on_progress=on_progress, examples=job.examples if rank == 0 else 0)
        metrics["eval_micro_batches"] = len(share.loss_batches) + len(share.prompt_batches)
        done_before += metrics["eval_micro_batches"]
        per_file.append(metrics)
    if board is not None:  # Ray Train keeps only metrics that come with a checkpoint
        ray.get(board.set_result.remote(per_file))
    ray.train.report({})  # every worker reports, the same number of times


def harness_worker(loop_config: dict) -> None:
    """lm-evaluation-harness on every rank over the same tasks; the model splits the requests across
    ranks and gathers the results (launcher.eval.harness_runner), so every rank computes the same
    scores and rank 0 hands them to the driver."""
    job = EvalJob.model_validate(loop_config["job"])
    device = start_worker(job.use_gpu)
    import ray.train

    from calm_dist.distributed.lockstep_eval import new_cache_for
    from launcher.eval.harness_model import CalmLM, evaluate_tasks
    from launcher.eval.harness_runner import Runner

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    loaded = load_model(job, device, world)
    runner = Runner(loaded.engine, lambda: new_cache_for(loaded.model, loaded.augmenting), loaded.pad,
                    loaded.tokenizer.eos_token_id, loaded.states_for, loaded.decode_states, device)
    tasks = job.harness
    lm = CalmLM(runner, loaded.tokenizer, loaded.model.anchor.config, batch_size=job.micro_batch_size,
                max_length=tasks.max_length, max_gen_toks=tasks.max_gen_toks)
    results = evaluate_tasks(lm, tasks)
    if rank == 0 and loop_config.get("board"):
        ray.get(ray.get_actor(loop_config["board"]).set_result.remote(results))
    ray.train.report({})
