import os

import pytest
import torch

# Tests run on CPU with a fixed thread count, so results are reproducible on any machine.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def train_steps(model, steps: int = 5, batch: int = 4, length: int = 12, lr: float = 3e-2, seed: int = 0):
    """A few optimiser steps on random tokens: enough to make every connection's output non-zero."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.composition_parameters(), lr=lr)
    vocab = model.anchor_dims.vocab_size
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, length), generator=generator)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


@pytest.fixture(params=["every_n", "into_input", "recency_null_scaled"])
def trained_pair(request):
    """A composed Llama pair (anchor 4x64, augmenting 4x32) with a trained, non-zero composition:
    the paper's every-n layout, one that also connects into the anchor's input embeddings and reads
    the augmenting model's token embeddings, or one with the cross-attention's recency bias, null key and
    output scaled to the residual stream."""
    from calm_dist.model.composed import compose
    from calm_dist.model.connections import INPUT, Connection
    from calm_dist.testing.tiny_models import tiny_model

    anchor = tiny_model("llama", layers=4, width=64, heads=4, seed=0)
    aug = tiny_model("llama", layers=4, width=32, heads=2, seed=1)
    if request.param == "every_n":
        return train_steps(compose(anchor, aug, every_n=2))
    source = INPUT if request.param == "into_input" else 1
    return train_steps(compose(anchor, aug, connections=[Connection(0, 3, INPUT), Connection(0, source, 2)],
                               recency_bias=request.param == "recency_null_scaled",
                               null_attention=request.param == "recency_null_scaled",
                               residual_scale=request.param == "recency_null_scaled"))


@pytest.fixture(scope="session")
def smollm2():
    """The real pretrained SmolLM2-135M-Instruct as a Hugging Face folder (calm_dist.testing.real_checkpoint;
    `make test` prepares it before the tests, so here it is only found)."""
    from calm_dist.testing.real_checkpoint import smollm2

    return smollm2()
