"""Rows marked keep_anchor: trained towards the anchor alone's predictions (KL), from the records'
field through tokenization, batches and preflight to the composed model's loss and its gradient."""

import json

import datasets
import pytest
import torch

from calm_dist.data.batches import ShardedBatches, collate
from calm_dist.data.records import DataError
from calm_dist.data.tokenization import tokenize_records
from calm_dist.model.anchor_alone import AnchorAlone
from calm_dist.model.architectures import decoder_layers
from calm_dist.model.composed import compose
from calm_dist.model.connections import Connection
from calm_dist.model.masks import positions_from_mask
from calm_dist.model.objectives import keep_anchor_loss, next_token_loss
from calm_dist.testing.tiny_models import FAMILIES, tiny_model
from calm_dist.testing.tokenizers import tiny_tokenizer
from tests.test_preflight import failure, folders, make  # noqa: F401 (folders: the module fixture)


def _batch(seed=0, rows=4, length=7, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=generator)
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    labels[:, :2] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    return logits, labels


def test_unkept_rows_are_the_next_token_loss_and_kept_rows_the_kl_formula():
    logits, labels = _batch()
    none = torch.zeros(4, dtype=torch.bool)
    torch.testing.assert_close(keep_anchor_loss(logits, labels, none, logits[:0]), next_token_loss(logits, labels),
                               rtol=1e-6, atol=0)

    keep = torch.tensor([False, True, False, True])
    anchor = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(1))
    predicted = labels[:, 1:] != -100
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                           reduction="none")
    p = anchor[:, :-1].softmax(-1)
    kl = (p * (p.log() - logits[keep, :-1].log_softmax(-1))).sum(-1)
    # Each kind of row its own mean: the task is not diluted by however many kept tokens the batch holds.
    by_hand = ce[~keep][predicted[~keep]].mean() + kl[predicted[keep]].mean()
    torch.testing.assert_close(keep_anchor_loss(logits, labels, keep, anchor), by_hand, rtol=1e-5, atol=0)
    # training.keep_anchor_weight weighs the KL term alone.
    weighed = ce[~keep][predicted[~keep]].mean() + 2.5 * kl[predicted[keep]].mean()
    torch.testing.assert_close(keep_anchor_loss(logits, labels, keep, anchor, 2.5), weighed, rtol=1e-5, atol=0)



def _gradient(loss_of, logits):
    logits = logits.detach().requires_grad_()
    loss = loss_of(logits)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_losses_equal_the_whole_ones_and_keep_only_indices(monkeypatch, dtype):
    """Past CHUNK_LOGITS a loss is taken in checkpointed chunks of positions: the same loss and
    gradient, and what the backward pass keeps is the chunks' indices, not fp32 copies of the logits."""
    from calm_dist.model import objectives

    vocab = 301
    logits, labels = _batch(rows=5, length=9, vocab=vocab)
    logits = logits.to(dtype)
    keep = torch.tensor([False, True, False, True, True])
    anchor = torch.randn(3, 9, vocab, generator=torch.Generator().manual_seed(1)).to(dtype)
    losses = {
        "next_token": lambda x: next_token_loss(x, labels),
        "keep_anchor": lambda x: keep_anchor_loss(x, labels, keep, anchor, 2.5),
        "none_kept": lambda x: keep_anchor_loss(x, labels, torch.zeros(5, dtype=torch.bool), anchor[:0]),
        "all_kept": lambda x: keep_anchor_loss(x, labels, torch.ones(5, dtype=torch.bool),
                                               torch.cat([anchor, anchor[:2]])),
    }
    whole = {name: _gradient(loss, logits) for name, loss in losses.items()}
    monkeypatch.setattr(objectives, "CHUNK_LOGITS", 3 * vocab)  # 3 positions a chunk, the last one short
    for name, loss in losses.items():
        chunked = _gradient(loss, logits)
        torch.testing.assert_close(chunked[0], whole[name][0], rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(chunked[1], whole[name][1], rtol=1e-5, atol=1e-8, msg=name)
    torch.testing.assert_close(whole["none_kept"][0], whole["next_token"][0], rtol=1e-6, atol=0)

    def saved_bytes(loss_of) -> int:
        x = logits.detach().requires_grad_()
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_of(x)
        return sum(storages.values())

    logits_bytes = logits.numel() * logits.element_size()
    assert saved_bytes(losses["keep_anchor"]) < logits_bytes / 10
    monkeypatch.setattr(objectives, "CHUNK_LOGITS", 1 << 28)
    assert saved_bytes(losses["keep_anchor"]) > logits_bytes


def _composed_batch():
    anchor = tiny_model("llama", layers=4, width=64, seed=0)
    composed = compose(anchor, tiny_model("llama", layers=4, width=32, heads=2, seed=1), every_n=2)
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return composed, ids, mask, labels


def _largest_gradient(composed, loss):
    composed.zero_grad()
    loss.backward()
    return max(p.grad.abs().max().item() for p in composed.composition_parameters() if p.grad is not None)


def test_an_untrained_composition_keeps_the_anchor_exactly_so_kept_rows_give_no_loss_and_no_gradient():
    composed, ids, mask, labels = _composed_batch()
    with composed.attached():  # as the training loop holds it, so the anchor-alone pass meets the hooks
        loss = composed(ids, mask, labels=labels, keep_anchor=torch.ones(4, dtype=torch.bool)).loss
        kept = _largest_gradient(composed, loss)
    assert loss.item() == 0.0
    learned = _largest_gradient(composed, composed(ids, mask, labels=labels).loss)
    # The KL's gradient is softmax(model) - softmax(anchor) = 0, but for the rounding of the softmax's sum.
    assert kept < 1e-6 * learned


def test_kept_rows_pull_a_trained_composition_back_towards_the_anchor():
    composed, ids, mask, labels = _composed_batch()
    for p in composed.composition_parameters():  # a composition that changes the anchor's predictions
        torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([True, False, True, True])
    loss = composed(ids, mask, labels=labels, keep_anchor=keep).loss
    assert loss.item() > 0
    optimizer = torch.optim.SGD(composed.composition_parameters(), lr=0.5)
    kept = composed.anchor(ids[keep], attention_mask=mask[keep]).logits

    def divergence():
        with torch.no_grad():
            ours = composed(ids[keep], mask[keep]).logits
        return keep_anchor_loss(ours, labels[keep], torch.ones(3, dtype=torch.bool), kept).item()

    before = divergence()
    for _ in range(5):
        optimizer.zero_grad()
        composed(ids, mask, labels=labels, keep_anchor=keep).loss.backward()
        optimizer.step()
    assert divergence() < before


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fork", [2, 0, -1])
def test_the_anchor_alone_from_the_lowest_connection_is_the_anchor(family, fork):
    """Run from the fork layer's output in the composed forward, it is the whole anchor on those rows
    (padding and position ids included), and the anchor's layers are its own again afterwards."""
    anchor = tiny_model(family, layers=4, width=64, seed=0)
    composed = compose(anchor, tiny_model(family, layers=4, width=32, heads=2, seed=1),
                       connections=[Connection(0, 1, fork), Connection(0, 3, 3)])
    for p in composed.composition_parameters():  # the composition changes every layer from the fork up
        torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    positions = positions_from_mask(mask)
    keep = torch.tensor([True, False, True])
    layers = list(decoder_layers(anchor))
    alone = AnchorAlone(anchor, fork)
    with composed.attached(), alone.capturing(keep):
        composed(ids, mask)
    found = alone.logits(ids[keep], mask[keep], positions[keep])
    expected = anchor(ids[keep], attention_mask=mask[keep], position_ids=positions[keep]).logits
    assert list(decoder_layers(anchor)) == layers
    assert not torch.allclose(composed(ids, mask).logits[keep], expected, atol=1e-3)
    torch.testing.assert_close(found[mask[keep] == 1], expected[mask[keep] == 1], rtol=1e-5, atol=1e-5)


def test_lora_keeps_its_base_model_the_same_way():
    """The LoRA baseline's loss on kept rows: the KL divergence from the base model with the adapters
    off, run again only from the lowest adapted layer."""
    from launcher.kv_arithmetic.lora_baseline import keep_anchor_lm_loss, with_lora

    model = with_lora(tiny_model("llama", layers=4, width=64, seed=0), rank=4, layers=[2, 3])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init: the adapters would change nothing
            torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(5))
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    keep = torch.tensor([True, True, False])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "keep_anchor": keep}
    found = keep_anchor_lm_loss(model, layers=[2, 3])(batch)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids[keep], attention_mask=mask[keep]).logits
    expected = keep_anchor_loss(model(input_ids=ids, attention_mask=mask).logits, labels, keep, base)
    assert found.item() > 0
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=0)


RECORDS = [{"prompt": "ab", "completion": "cd", "keep": True}, {"prompt": "b", "completion": "ca", "keep": False},
           {"prompt": "a", "completion": "dd"}]


def test_tokenized_rows_and_batches_carry_the_field_and_a_missing_value_is_false():
    dataset = datasets.Dataset.from_list(RECORDS)
    rows = tokenize_records(dataset, tiny_tokenizer(), max_length=16, prompt_field="prompt",
                            completion_field="completion", keep_anchor_field="keep")
    assert rows["keep_anchor"] == [True, False, False]
    assert collate(list(rows), pad_token_id=0)["keep_anchor"].tolist() == [True, False, False]
    batch = next(iter(ShardedBatches(rows, micro_batch_size=3, rank=0, world_size=1, seed=0, pad_token_id=0,
                                     shuffle=False)))
    assert batch["keep_anchor"].tolist() == [True, False, False]
    plain = tokenize_records(dataset, tiny_tokenizer(), max_length=16, prompt_field="prompt",
                             completion_field="completion")
    assert "keep_anchor" not in plain.column_names


def test_a_field_that_is_not_true_false_is_named():
    dataset = datasets.Dataset.from_list([{"text": "ab", "keep": "yes"}])
    with pytest.raises(DataError, match=r"field 'keep' \(the keep_anchor_field\) holds Value\('string'"):
        tokenize_records(dataset, tiny_tokenizer(), max_length=16, text_field="text", keep_anchor_field="keep")


def test_preflight_names_a_keep_anchor_field_the_training_records_lack(folders):  # noqa: F811
    message = failure(make(folders, {"data.keep_anchor_field": "ordinary"}))
    assert message == (f"data.train: {folders['train']}: no field 'ordinary' (the keep_anchor_field); "
                       "its fields are ['text']")
    marked = folders["train"].with_name("marked.jsonl")
    marked.write_text("".join(json.dumps({"text": f"{i}+{i}={2 * i}", "ordinary": i % 2 == 0}) + "\n"
                              for i in range(8)))
    from launcher.preflight import preflight

    preflight(make(folders, {"data.keep_anchor_field": "ordinary", "data.train": str(marked)}))
