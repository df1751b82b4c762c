"""The training loop's callbacks: every step is announced (the driver's progress bar moves each step),
only logged steps carry metrics, checkpoints come at their interval."""

from contextlib import nullcontext
from types import SimpleNamespace

import torch

from calm_dist.distributed.train_loop import LoopSettings, run


class CountingEngine:
    """The three DeepSpeed engine calls the loop makes, on a one-parameter model."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.module = SimpleNamespace(attached=nullcontext)
        self.steps = 0

    def train(self):
        pass

    def __call__(self, input_ids, attention_mask, labels, augmenting_states, augmenting_views, keep_anchor=None,
                 keep_anchor_weight=1.0):
        return SimpleNamespace(loss=self.weight * input_ids.float().mean())

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1

    def get_lr(self):
        return [0.1]


def batches():
    while True:
        yield {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
               "labels": torch.ones(2, 3, dtype=torch.long)}


def test_every_step_is_announced_and_only_logged_steps_carry_metrics():
    stepped, logged, checkpointed = [], [], []
    engine = CountingEngine()
    last = run(engine, batches(), lambda batch: {}, LoopSettings(steps=7, gradient_accumulation_steps=2, log_every=3,
                                                                 eval_every=None, checkpoint_every=4),
               start_step=1, on_log=lambda step, metrics: logged.append(step), on_checkpoint=checkpointed.append,
               on_step=stepped.append)
    assert stepped == [2, 3, 4, 5, 6, 7]  # resumed after step 1
    assert logged == [3, 6, 7] and checkpointed == [4, 7]
    assert engine.steps == 12 and last["step"] == 7 and last["loss"] == 1.0
