"""composition.hide_unknown_tokens: an augmenting model with a tokenizer of its own contributes nothing
where it reads only `<unk>` (and its bos), exactly, however trained the composition; what it knows still
reaches the anchor; cached decoding, precomputed views and checkpoints keep the option."""

import pytest
import torch

from calm_dist.data.batches import collate
from calm_dist.errors import CompositionError
from calm_dist.model.alignment import collate_views, uninformative_ids, views_from_batch
from calm_dist.model.composed import compose
from calm_dist.model.composition_checkpoint import load_composition, save_composition
from calm_dist.testing.tiny_models import tiny_model
from calm_dist.testing.tokenizers import sample_texts, tiny_tokenizer, trained_tokenizer

BOS = 1
# WordPiece trained on sample_texts: capitalised and Greek words are outside its vocabulary.
UNKNOWN = ["Zebra QQ", "Ζεύς Xylo", "Quartz Yak Zulu"]


@pytest.fixture(scope="module")
def tokenizers():
    texts = sample_texts(1500, seed=0)
    return trained_tokenizer("bpe", texts, 500), trained_tokenizer("wordpiece", texts, 300)


def anchor_ids(bpe, texts):
    rows = [[BOS] + bpe.encode(t, add_special_tokens=False) for t in texts]
    data = collate([{"input_ids": r} for r in rows], 0)
    return data["input_ids"], data["attention_mask"]


def build(tokenizers, null_attention=True, hide=True):
    """Anchor (BPE) + an augmenting model reading through WordPiece, its composition weights random (as
    if trained: an untrained one adds 0 everywhere anyway)."""
    bpe, wordpiece = tokenizers
    model = compose(tiny_model("llama", layers=4, width=64, heads=4, vocab=500, seed=0),
                    tiny_model("llama", layers=2, width=32, heads=2, vocab=300, seed=1), every_n=1,
                    tokenizers=[bpe, wordpiece], recency_bias=True, null_attention=null_attention,
                    hide_unknown_tokens=hide)
    torch.manual_seed(0)
    for parameter in model.composition_parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return model.eval()


@pytest.mark.parametrize("null_attention", [True, False])
@torch.no_grad()
def test_text_the_augmenting_model_has_no_word_for_leaves_the_anchor_exact(tokenizers, null_attention):
    bpe, wordpiece = tokenizers
    for text in UNKNOWN:
        assert set(wordpiece.encode(text, add_special_tokens=False)) == {wordpiece.unk_token_id}
    ids, mask = anchor_ids(bpe, UNKNOWN)
    model = build(tokenizers, null_attention)
    real = mask.bool()  # padding positions get other position ids in the two calls
    anchor = model.anchor(ids, attention_mask=mask).logits[real]
    assert torch.equal(model(ids, mask).logits[real], anchor)
    # Without the option the same weights change the anchor there: the test above can fail.
    shown = build(tokenizers, null_attention, hide=False)
    assert not torch.allclose(shown(ids, mask).logits[real], anchor, atol=1e-2)


@torch.no_grad()
def test_known_words_still_reach_the_anchor_and_only_from_where_they_are(tokenizers):
    bpe, _ = tokenizers
    model = build(tokenizers)
    # "Zebra" unknown, then known words: up to "Zebra" the anchor's own logits, after it the composition's.
    prefix = [BOS] + bpe.encode("Zebra", add_special_tokens=False)
    ids = torch.tensor([prefix + bpe.encode(" kazu mori lan", add_special_tokens=False)])
    composed, anchor = model(ids).logits[0], model.anchor(ids).logits[0]
    assert torch.equal(composed[: len(prefix)], anchor[: len(prefix)])
    assert (composed[len(prefix) + 1:] - anchor[len(prefix) + 1:]).abs().amax() > 1e-2


@torch.no_grad()
def test_cached_decoding_and_precomputed_views_equal_recomputation(tokenizers):
    bpe, _ = tokenizers
    model = build(tokenizers)
    texts = ["Zebra kazu 12 + mori", "Ζεύς epi lan = 7"]
    ids, mask = anchor_ids(bpe, texts)
    continuation = [bpe.encode(" Quartz vor 5 Yak sha ; lan", add_special_tokens=False)] * 2
    cache, step = model.new_cache(), ids
    for s in range(len(continuation[0])):
        cached = model(step, attention_mask=mask, cache=cache).logits[:, -1]
        torch.testing.assert_close(cached, model(ids, mask).logits[:, -1], rtol=0, atol=1e-5, msg=f"step {s}")
        token = torch.tensor([[c[s]] for c in continuation])
        ids, mask, step = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1), token
    assert cache.readable_masks[0].shape == cache.augmenting_masks[0].shape

    records = [{"input_ids": [BOS] + bpe.encode(t, add_special_tokens=False)} for t in texts + UNKNOWN]
    for record in records:
        aug_ids, visible = model.aligner.align_ids(record["input_ids"])[0]
        record["augmenting0_input_ids"], record["augmenting0_visible"] = aug_ids, visible
    data = collate([{"input_ids": r["input_ids"]} for r in records], 0)
    data.update(collate_views(records, 1, [model.aligner.pad_id(0)], data["input_ids"].shape[1]))
    from_data = model(data["input_ids"], data["attention_mask"], augmenting_views=views_from_batch(data, 1)).logits
    assert torch.equal(from_data, model(data["input_ids"], data["attention_mask"]).logits)


def test_the_option_is_saved_with_the_composition(tokenizers, tmp_path):
    model = build(tokenizers)
    path = save_composition(model, tmp_path / "composition")
    again = load_composition(path, model.anchor, list(model.augmenting), tokenizers=list(tokenizers))
    assert again.options.hide_unknown_tokens
    ids, mask = anchor_ids(tokenizers[0], ["Zebra kazu mori"])
    with torch.no_grad():
        assert torch.equal(again(ids, mask).logits, model(ids, mask).logits)


def test_nothing_to_hide_is_refused(tokenizers):
    with pytest.raises(CompositionError, match="hide_unknown_tokens: no augmenting model reads through a tokenizer"):
        compose(tiny_model(vocab=500), tiny_model(width=32, heads=2, vocab=500, seed=1), every_n=2,
                hide_unknown_tokens=True)
    # A tokenizer whose unknown token is its eos (GPT-2's convention) has no unknown token of its own.
    eos_as_unk = tiny_tokenizer(64)
    eos_as_unk.unk_token = eos_as_unk.eos_token
    assert uninformative_ids(eos_as_unk) == []
    assert uninformative_ids(tokenizers[1]) == [tokenizers[1].unk_token_id, tokenizers[1].bos_token_id]
