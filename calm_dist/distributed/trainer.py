"""The Trainer: one anchor worker's training run, from a validated training config to the exported
composition — build, resume, train, checkpoint, export.

It knows DeepSpeed and torch.distributed, never Ray: the Ray worker (launcher/train/worker.py) hands it
the config and the checkpoint to resume from, and gets each training checkpoint back through `report`
and each logged step through `on_log`. Where the augmenting models run (beside the anchor, or on ranks
of their own) is one object (calm_dist.distributed.placement's Colocated or Pipelined), so the training
code reads the same for both.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from calm_dist.data.batches import ShardedBatches
from calm_dist.data.records import DataError, load_records
from calm_dist.data.tokenization import tokenize_records
from calm_dist.distributed.base_models import (
    base_config,
    load_anchor,
    load_tokenizer,
    load_whole,
    own_tokenizers,
)
from calm_dist.distributed.checkpoint_layout import STATE
from calm_dist.distributed.engine import build_engine, deepspeed_config, init_process_group, lr_lambda
from calm_dist.distributed.lockstep_eval import (
    eval_share,
    evaluate,
    new_cache_for,
)
from calm_dist.distributed.placement import AugmentingClient, AugmentingServer, Colocated, Layout, Pipelined
from calm_dist.distributed.train_loop import LoopSettings, run
from calm_dist.distributed.training_state import export_composition, load_training_state, save_training_state
from calm_dist.model.architectures import dims_from_config
from calm_dist.model.composed import ComposedModel
from calm_dist.model.connections import Connection

# (step, a folder holding this rank's part of the checkpoint) -> None; the folder is gone afterwards
Report = Callable[[int, str], None]


def connections_of(config) -> list[Connection]:
    """The config's connections, from the models' configs alone (the same on every rank)."""
    anchor = base_config(config.models.anchor)
    return config.composition.layout(anchor.num_hidden_layers,
                                     [base_config(m).num_hidden_layers for m in config.models.augmenting])


def serve_augmenting(config, layout: Layout, exchange, device: torch.device, on_barrier: Callable[[], None]) -> None:
    """What an augmenting rank of a pipelined run does: serve hidden states until the anchor ranks stop,
    taking part in every checkpoint report (on_barrier)."""
    torch.manual_seed(config.training.seed)
    server = AugmentingServer(load_whole(config.models.augmenting, device), connections_of(config), layout,
                              exchange, device, on_barrier=on_barrier)
    server.serve()


class Trainer:
    """One anchor rank's training. `config` is a launcher.train_config.TrainConfig; `exchange` and
    `layout` are given for a pipelined run (the augmenting ranks are then elsewhere)."""

    def __init__(self, config, device: torch.device, rank: int, *, layout: Layout | None = None, exchange=None):
        self.config, self.device, self.rank = config, device, rank
        train = config.training
        torch.manual_seed(train.seed)
        self.data_world = config.ray.num_workers  # the anchor ranks, which come first
        self.connections = connections_of(config)
        init_process_group(config.ray.use_gpu)
        ds_config = deepspeed_config(
            micro_batch_size=train.micro_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            data_parallel_size=self.data_world,
            zero_stage=config.deepspeed.zero_stage,
            offload_optimizer=config.deepspeed.offload_optimizer,
            offload_params=config.deepspeed.offload_params,
            grad_clip=train.optimizer.grad_clip,
            extra=config.deepspeed.extra,
        )
        anchor = load_anchor(config.models.anchor, ds_config, device)
        if config.deepspeed.activation_checkpointing:
            anchor.activation_checkpointing_enable({"use_reentrant": False})
        self.tokenizer, self.pad = load_tokenizer(config.models.tokenizer or config.models.anchor.path)
        # Augmenting models with a tokenizer of their own read the text (calm_dist.model.alignment).
        self.aligner, self.augmenting_pads = own_tokenizers(self.tokenizer, [m.tokenizer for m in config.models.augmenting])
        augmenting_configs = [base_config(m) for m in config.models.augmenting]
        self.model = ComposedModel(anchor, [dims_from_config(c) for c in augmenting_configs], self.connections,
                                   config.composition.options(), aligner=self.aligner)
        opt = train.optimizer
        self.engine, _, _ = build_engine(
            self.model, ds_config, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps,
            schedule=lr_lambda(train.schedule.kind, train.schedule.warmup_steps, train.steps,
                               train.schedule.min_lr_ratio))
        self.batches = ShardedBatches(self._tokenized(load_records(config.data.train, config.data.split),
                                                      config.data.keep_anchor_field),
                                      micro_batch_size=train.micro_batch_size, rank=rank, world_size=self.data_world,
                                      seed=train.seed, pad_token_id=self.pad, augmenting_pad_ids=self.augmenting_pads)
        if exchange is not None:
            self.augmenting = Pipelined(AugmentingClient(
                layout, exchange, self.connections, [c.hidden_size for c in augmenting_configs],
                [getattr(torch, m.dtype) for m in config.models.augmenting], device, config.placement.prefetch))
        else:
            self.augmenting = Colocated(load_whole(config.models.augmenting, device), self.connections)
        self.step = 0

    def _tokenized(self, records, keep_anchor_field: str | None = None):
        data = self.config.data
        return tokenize_records(records, self.tokenizer, max_length=data.max_length, aligner=self.aligner,
                                text_field=data.text_field, prompt_field=data.prompt_field,
                                completion_field=data.completion_field, keep_anchor_field=keep_anchor_field)

    def resume(self, directory: str | Path, name: str | None = None) -> None:
        """Continue from a training checkpoint folder (`name`: how to call it in an error)."""
        self.step, data_state = load_training_state(self.engine, directory)
        try:
            self.batches.load_state_dict(data_state)
        except DataError as err:  # resumed with other data or batch sizes: the user's to fix
            raise DataError(f"{name or directory}/{STATE}: {err}") from None

    def evaluation(self) -> Callable[[], dict] | None:
        """The training loop's evaluate(): eval loss, and exact match of greedy completions for
        prompt/completion data, over the first training.eval_samples records; each anchor rank
        evaluates an equal share (ZeRO-3 needs lockstep). None when the config asks for none."""
        train, data = self.config.training, self.config.data
        if not (data.eval and train.eval_every):
            return None
        records = load_records(data.eval, data.split)
        tokenized = self._tokenized(records)  # records with nothing to predict drop out here
        records = records.select(range(min(len(records), train.eval_samples)))
        tokenized = tokenized.select(range(min(len(tokenized), train.eval_samples)))
        share = eval_share(records, tokenized, self.tokenizer, micro_batch_size=train.micro_batch_size,
                           rank=self.rank, world_size=self.data_world, pad_token_id=self.pad,
                           prompt_field=data.prompt_field, completion_field=data.completion_field,
                           augmenting_pad_ids=self.augmenting_pads)

        def run_evaluation() -> dict:
            metrics = evaluate(self.engine, share, decode=self.tokenizer.decode, states_for=self.augmenting.states_for,
                               decode_states=self.augmenting.decode_states,
                               new_cache=lambda: new_cache_for(self.model, self.augmenting.models),
                               max_new_tokens=train.eval_max_new_tokens, pad_token_id=self.pad,
                               eos_token_id=self.tokenizer.eos_token_id, device=self.device)
            metrics.pop("eval_samples", None)
            return metrics

        return run_evaluation

    def checkpoint(self, step: int, report: Report) -> None:
        """Every rank writes its part of the training state; report hands it on (to Ray Train)."""
        self.augmenting.before_checkpoint()
        with tempfile.TemporaryDirectory() as directory:
            save_training_state(self.engine, directory, step, self.augmenting.data_state(self.batches))
            report(step, directory)

    def fit(self, report: Report, on_log: Callable[[int, dict], None],
            on_step: Callable[[int], None] = lambda step: None) -> None:
        """Train from the current step to training.steps, logging and checkpointing as configured; on_step
        hears of every step."""
        train = self.config.training
        settings = LoopSettings(train.steps, self.config.gradient_accumulation_steps, train.log_every,
                                train.eval_every, train.checkpoint_every, train.keep_anchor_weight)
        stream = self.augmenting.feed(self._on_device(iter(self.batches)), self.batches)
        if self.step < train.steps:
            run(self.engine, stream, self.augmenting.states_for, settings, self.step, on_log,
                lambda step: self.checkpoint(step, report), self.evaluation(), on_step)
        self.augmenting.stop()

    def _on_device(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            yield {k: v.to(self.device) for k, v in batch.items()}

    def export(self, path: str | Path) -> Path | None:
        """The finished composition (calm_dist.model.composition_checkpoint's format), written by rank 0."""
        return export_composition(
            self.model, path, extra={"trained_steps": self.config.training.steps, "run": self.config.name},
            augmenting_sources=[m.path for m in self.config.models.augmenting])
