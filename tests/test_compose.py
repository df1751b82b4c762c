"""The composed model's structure: families, connections, parameters, frozen bases, masks."""

import copy

import pytest
import torch

from calm_dist.errors import CompositionError
from calm_dist.model.augmenting import augmenting_states
from calm_dist.model.composed import compose
from calm_dist.model.connections import INPUT, Connection, every_n
from calm_dist.model.cross_attention import CrossAttention
from calm_dist.testing.tiny_models import FAMILIES, tiny_model
from tests.conftest import train_steps


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_composition_equals_anchor_bitwise(family):
    anchor = tiny_model(family, layers=4, width=64, seed=0)
    aug = tiny_model(family, layers=4, width=32, heads=2, seed=1)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    composed = compose(anchor, aug, every_n=2)
    assert torch.equal(composed(ids, mask).logits, anchor(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_its_composition(family):
    anchor = tiny_model(family, layers=4, width=64, seed=0)
    aug = tiny_model(family, layers=4, width=32, heads=2, seed=1)
    composed = train_steps(compose(anchor, aug, every_n=2), steps=2)
    ids = torch.randint(3, 128, (2, 9))
    assert not torch.allclose(composed(ids).logits, anchor(ids).logits)


def test_unsupported_architecture_is_named():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                   vocab_size=128, word_embed_proj_dim=32))
    with pytest.raises(CompositionError, match=r"OPTForCausalLM \(model_type='opt'\).*DECODER_LAYERS"):
        compose(tiny_model(), opt)


def test_every_n_matches_the_paper_layout():
    assert every_n(8, 8, 4) == [Connection(0, 3, 3), Connection(0, 7, 7)]
    assert every_n(8, 16, 4) == [Connection(0, 3, 7), Connection(0, 7, 15)]
    assert every_n(12, 32, 4, augmenting=1) == [Connection(1, 3, 9), Connection(1, 7, 20), Connection(1, 11, 31)]
    with pytest.raises(CompositionError, match="fewer than every_n=4"):
        every_n(2, 8, 4)


@pytest.mark.parametrize(
    "connection, message",
    [
        (Connection(0, 4, 0), "augmenting layer 4 is out of range"),
        (Connection(0, 0, 9), "anchor layer 9 is out of range"),
        (Connection(2, 0, 0), "augmenting model 2 does not exist"),
        (Connection(0, -2, 0), "augmenting layer -2 is out of range"),
        (Connection(0, 0, -2), "anchor layer -2 is out of range"),
    ],
)
def test_bad_connections_are_refused(connection, message):
    with pytest.raises(CompositionError, match=message):
        compose(tiny_model(), tiny_model(width=32, heads=2), connections=[connection])


def test_duplicate_connection_is_refused():
    with pytest.raises(CompositionError, match="listed twice"):
        compose(tiny_model(), tiny_model(width=32, heads=2), connections=[Connection(0, 1, 1)] * 2)


def test_vocabulary_mismatch_is_refused():
    with pytest.raises(CompositionError, match="vocabulary of 256 tokens but the anchor .* has 128"):
        compose(tiny_model(vocab=128), tiny_model(vocab=256))


def test_heads_must_divide_anchor_width():
    with pytest.raises(CompositionError, match="num_heads=5"):
        compose(tiny_model(width=64), tiny_model(width=32, heads=2), num_heads=5)


def test_several_augmenting_models_and_shared_anchor_layer():
    anchor = tiny_model(layers=4, width=64)
    augs = [tiny_model(layers=4, width=32, heads=2, seed=1), tiny_model("gpt2", layers=2, width=48, heads=4, seed=2)]
    connections = [Connection(0, 1, 2), Connection(1, 1, 2), Connection(0, 3, 3)]
    composed = train_steps(compose(anchor, augs, connections=connections), steps=3)
    ids = torch.randint(3, 128, (2, 8))
    base = composed(ids).logits
    # Each augmenting model matters: zeroing one connection's output changes the logits.
    for c in connections:
        saved = composed.composition[c.name].out.weight.detach().clone()
        with torch.no_grad():
            composed.composition[c.name].out.weight.zero_()
        assert not torch.allclose(composed(ids).logits, base)
        with torch.no_grad():
            composed.composition[c.name].out.weight.copy_(saved)


@pytest.mark.parametrize("tokens", [1, 7, 400])
def test_folded_and_plain_key_value_maps_agree(tokens):
    from calm_dist.model.cross_attention import KeyValueProjection

    torch.manual_seed(0)
    kv = KeyValueProjection(32, 64)
    x = torch.randn(tokens, 32, dtype=torch.float64)
    kv = kv.double()
    reference = (x @ kv.proj_weight.T + kv.proj_bias) @ kv.kv_weight.T
    keys, values = kv(x)
    torch.testing.assert_close(torch.cat([keys, values], -1), reference)
    assert kv.folds_for(400) and not kv.folds_for(1)


def test_parameter_count_matches_formula_and_only_composition_trains():
    anchor, aug = tiny_model(layers=8, width=64), tiny_model(layers=8, width=32, heads=2, seed=1)
    composed = compose(anchor, aug, every_n=4)
    d_a, d_b, n = 32, 64, 2
    expected = n * (d_a * d_b + d_b + 4 * d_b * d_b)  # the paper's formula plus f_proj's bias
    trainable = [p for p in composed.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected == composed.expected_composition_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in composed.composition_parameters()}


def test_recency_bias_adds_one_slope_per_head_and_trains_them():
    anchor, aug = tiny_model(layers=8, width=64), tiny_model(layers=8, width=32, heads=2, seed=1)
    composed = compose(anchor, aug, every_n=4, num_heads=8, recency_bias=True, null_attention=True)
    expected = 2 * (32 * 64 + 64 + 4 * 64 * 64 + 8)
    assert sum(p.numel() for p in composed.composition_parameters()) == expected
    assert composed.expected_composition_parameters() == expected
    train_steps(composed)
    assert all(not torch.equal(m.recency.slope, torch.ones(8)) for m in composed.composition.values())


def test_keys_after_counts_visible_keys_only():
    from calm_dist.model.cross_attention import keys_after

    # Query 3 of a row whose first two keys are left padding, and a cross-tokenizer row that sees 0, 1, 3.
    allowed = torch.tensor([[False, False, True, True], [True, True, False, True]])
    distance = keys_after(allowed)
    assert distance[0, 2:].tolist() == [1, 0] and distance[1, [0, 1, 3]].tolist() == [2, 1, 0]


@pytest.mark.parametrize("recency_bias, null_attention", [(True, False), (False, True), (True, True)])
def test_cross_attention_options_are_the_formula(recency_bias, null_attention):
    """softmax over [null: 0] + [q.k/sqrt(d) - slope * (visible keys after it)], values [0] + v, in float64,
    on left-padded rows, one of them with a query that sees no key at all."""
    from calm_dist.model.cross_attention import CrossAttention

    torch.manual_seed(0)
    block = CrossAttention(24, 32, 4, recency_bias=recency_bias, null_attention=null_attention).double()
    torch.nn.init.normal_(block.out.weight)
    if recency_bias:
        block.recency.slope.data = torch.tensor([0.0, 0.3, 1.0, 3.0], dtype=torch.float64)
    anchor, aug = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    allowed = (torch.ones(5, 5).tril().bool()[None] & mask[:, None, :])[:, None]
    keys, values = block.keys_values(aug)
    with torch.no_grad():
        expected = _attention_by_hand(block, anchor, keys, values, allowed, recency_bias, null_attention)
    got = block(anchor, keys, values, allowed)
    torch.testing.assert_close(got, block.out(expected.transpose(1, 2).reshape(2, 5, 32)))
    assert torch.equal(got[0, :2], torch.zeros(2, 32, dtype=torch.float64))  # padding queries see nothing


def _attention_by_hand(block, anchor, keys, values, allowed, recency_bias, null_attention):
    query = block._split_heads(block.q(torch.nn.functional.rms_norm(anchor, (32,), eps=block.eps)))
    expected = torch.zeros(2, 4, 5, 8, dtype=torch.float64)
    for b in range(2):
        for h in range(4):
            for t in range(5):
                seen = [s for s in range(5) if allowed[b, 0, t, s]]
                logits = [float(query[b, h, t] @ keys[b, h, s]) / 8**0.5 for s in seen]
                if recency_bias:
                    logits = [x - float(block.recency.slope[h]) * (len(seen) - 1 - i) for i, x in enumerate(logits)]
                rows = [values[b, h, s] for s in seen]
                if null_attention:
                    logits, rows = [0.0, *logits], [torch.zeros(8, dtype=torch.float64), *rows]
                if rows:
                    weights = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                    expected[b, h, t] = sum(w * v for w, v in zip(weights, rows, strict=True))
    return expected


def test_frozen_models_never_change_nor_get_gradients():
    anchor, aug = tiny_model(width=64), tiny_model(width=32, heads=2, seed=1)
    before = copy.deepcopy(anchor.state_dict()), copy.deepcopy(aug.state_dict())
    composed = train_steps(compose(anchor, aug, connections=[Connection(0, 1, 2)]), steps=3)
    for model, saved in zip((anchor, aug), before, strict=True):
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    # The augmenting forward builds no graph; anchor layers below the connection need no backward.
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
             for i, layer in enumerate(anchor.model.layers)]
    composed.train()
    ids = torch.randint(3, 128, (2, 8))
    states = composed.augmenting_states(ids)
    composed(ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    assert not states[(0, 1)].requires_grad
    # Layer 2's own output is seen here before the composition adds to it: only layer 3 needs backward.
    assert [outputs[i].requires_grad for i in range(4)] == [False, False, False, True]


def test_anchor_alone_is_plain_after_composed_forward(trained_pair):
    ids = torch.randint(3, 128, (2, 8))
    plain = copy.deepcopy(trained_pair.anchor)
    composed_logits = trained_pair(ids).logits
    assert not torch.allclose(composed_logits, plain(ids).logits)
    assert torch.equal(trained_pair.anchor(ids).logits, plain(ids).logits)
    assert all(not layer._forward_hooks for layer in trained_pair.anchor.model.layers)


def test_future_tokens_never_change_past_logits(trained_pair):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 16), generator=g)
    logits = trained_pair(ids).logits
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(3, 128, changed[:, t + 1:].shape, generator=g)
        other = trained_pair(changed).logits
        assert torch.equal(other[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(other[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_other_logits(trained_pair, side):
    g = torch.Generator().manual_seed(4)
    lengths = [12, 7, 3]
    rows = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        cols = slice(12 - len(row), 12) if side == "left" else slice(0, len(row))
        ids[r, cols], mask[r, cols] = row, 1
    logits = trained_pair(ids, mask).logits
    # Other pad values: bitwise identical logits at every real position.
    repadded = ids.masked_fill(mask == 0, 77)
    assert torch.equal(trained_pair(repadded, mask).logits[mask.bool()], logits[mask.bool()])
    # And each row equals that row run alone, unpadded.
    for r, row in enumerate(rows):
        alone = trained_pair(row[None]).logits[0]
        torch.testing.assert_close(logits[r][mask[r].bool()], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("base_dtype, composition_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_mixed_precision(base_dtype, composition_dtype):
    anchor = tiny_model(width=64, dtype=base_dtype)
    aug = tiny_model(width=32, heads=2, seed=1, dtype=base_dtype)
    composed = compose(anchor, aug, every_n=2, dtype=composition_dtype)
    assert all(p.dtype == composition_dtype for p in composed.composition_parameters())
    ids = torch.randint(3, 128, (2, 8))
    assert torch.equal(composed(ids).logits, anchor(ids).logits)
    train_steps(composed, steps=2, lr=1e-2)
    out = composed(ids, labels=ids)
    assert out.logits.dtype == base_dtype and torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert not torch.equal(out.logits, anchor(ids).logits)


def test_activation_checkpointing_gives_the_same_gradients(trained_pair):
    ids = torch.randint(3, 128, (2, 10))

    def gradients():
        trained_pair.train()
        trained_pair.composition.zero_grad()
        saved = []  # bytes autograd keeps for backward: what checkpointing exists to cut

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with trained_pair.attached(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = trained_pair(ids, labels=ids).loss
        with trained_pair.attached():  # recomputed layers must see the composition too
            loss.backward()
        return [p.grad.clone() for p in trained_pair.composition_parameters()], sum(saved)

    plain, plain_saved = gradients()
    trained_pair.anchor.activation_checkpointing_enable({"use_reentrant": False})
    checkpointed, checkpointed_saved = gradients()
    assert checkpointed_saved < plain_saved, "the anchor's layers must really be checkpointed"
    assert not any(m.training for m in trained_pair.anchor.modules() if isinstance(m, torch.nn.Dropout))
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_states_computed_elsewhere_give_the_same_model(trained_pair):
    from calm_dist.model.augmenting import augmenting_states
    from calm_dist.model.composed import ComposedModel

    remote = ComposedModel(trained_pair.anchor, trained_pair.augmenting_dims, trained_pair.connections,
                           trained_pair.options)
    remote.composition.load_state_dict(trained_pair.composition.state_dict())
    assert len(remote.augmenting) == 0
    ids = torch.randint(3, 128, (2, 8))
    states = augmenting_states(list(trained_pair.augmenting), trained_pair.connections, ids)
    assert torch.equal(remote(ids, augmenting_states=states).logits, trained_pair(ids).logits)
    with pytest.raises(CompositionError, match="pass augmenting_states="):
        remote(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_connection_into_the_input_embeddings(family):
    """Anchor layer -1: the cross-attention changes the first decoder layer's input. Identity at init,
    then after training it changes the logits, and it is named as such in checkpoints."""
    anchor = tiny_model(family, layers=3, width=64, heads=4, seed=0)
    aug = tiny_model(family, layers=2, width=32, heads=2, seed=1)
    model = compose(anchor, aug, connections=[Connection(0, 1, INPUT)])
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, anchor(ids).logits)
    assert list(model.composition) == ["aug0_l1_to_anchor_input"]
    train_steps(model)
    assert not torch.allclose(model(ids).logits, anchor(ids).logits)
    assert torch.equal(anchor(ids).logits, tiny_model(family, layers=3, width=64, heads=4, seed=0)(ids).logits)


def test_a_connection_from_the_augmenting_token_embeddings_reads_exactly_them():
    """Augmenting layer -1: the states the cross-attention reads are the augmenting model's token
    embeddings of the ids (what its first layer reads), alone or beside a layer's output."""
    aug = tiny_model("llama", layers=2, width=32, heads=2, seed=1)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    connections = [Connection(0, INPUT, 1), Connection(0, 0, 2)]
    states = augmenting_states([aug], connections, ids)
    hidden = aug(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    assert torch.equal(states[(0, INPUT)], hidden[0])
    assert torch.equal(states[(0, INPUT)], aug.get_input_embeddings()(ids))
    assert torch.equal(states[(0, 0)], hidden[1])
    model = compose(tiny_model("llama", layers=3, width=64, heads=4, seed=0), aug, connections=connections)
    assert list(model.composition) == ["aug0_input_to_anchor_l1", "aug0_l0_to_anchor_l2"]
    with pytest.raises(CompositionError, match="and -1 for its token embeddings"):
        compose(tiny_model("llama", layers=3, width=64, heads=4, seed=0), aug, connections=[Connection(0, -2, 1)])


def test_residual_scale_multiplies_the_output_by_the_anchor_states_rms():
    """residual_scale: the output, in units of the RMS of the anchor state it joins (per position)."""
    torch.manual_seed(0)
    plain = CrossAttention(24, 32, 4, null_attention=True).double()
    scaled = CrossAttention(24, 32, 4, null_attention=True, residual_scale=True).double()
    torch.nn.init.normal_(plain.out.weight)  # non-zero, as after training
    scaled.load_state_dict(plain.state_dict())
    anchor_states = 20 * torch.randn(2, 5, 32, dtype=torch.float64)
    keys, values = plain.keys_values(torch.randn(2, 5, 24, dtype=torch.float64))
    rms = anchor_states.pow(2).mean(-1, keepdim=True).add(plain.eps).sqrt()
    assert torch.equal(scaled(anchor_states, keys, values, None), plain(anchor_states, keys, values, None) * rms)


def test_dropout_acts_in_training_mode_only():
    """composition.dropout drops augmenting states the cross-attention reads while training; in eval
    mode (decoding, calm eval) the block is exactly the one without dropout."""
    torch.manual_seed(0)
    plain = CrossAttention(24, 32, 4, null_attention=True).double()
    dropped = CrossAttention(24, 32, 4, null_attention=True, dropout=0.5).double()
    dropped.load_state_dict(plain.state_dict())
    states = torch.randn(2, 7, 24, dtype=torch.float64)
    plain.eval()
    dropped.eval()
    for a, b in zip(plain.keys_values(states), dropped.keys_values(states), strict=True):
        assert torch.equal(a, b)
    dropped.train()
    keys, _ = dropped.keys_values(states)
    again, _ = dropped.keys_values(states)
    assert not torch.equal(keys, plain.keys_values(states)[0]) and not torch.equal(keys, again)
