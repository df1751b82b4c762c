"""Composition across tokenizers: two real subword tokenizers trained here (byte-level BPE, Unigram),
causality in characters, cached decoding, identity at init, padding, checkpoints that refuse another
tokenizer."""

import pytest
import torch

from calm_dist.data.batches import collate
from calm_dist.errors import CompositionError
from calm_dist.model.alignment import (
    Aligner,
    AlignmentError,
    anchor_text,
    check_whitespace_stable,
    settled,
    whitespace_boundaries,
)
from calm_dist.model.composed import compose
from calm_dist.model.composition_checkpoint import load_composition, read_manifest, save_composition
from calm_dist.testing.tiny_models import tiny_model
from calm_dist.testing.tokenizers import sample_texts, trained_tokenizer

BOS = 1


@pytest.fixture(scope="module")
def tokenizers():
    texts = sample_texts(1500, seed=0)
    return {
        "bpe": trained_tokenizer("bpe", texts, 500),
        "unigram": trained_tokenizer("unigram", texts, 300),
        "wordpiece": trained_tokenizer("wordpiece", texts, 300),
    }


def encode(tokenizer, text):
    return [BOS] + tokenizer.encode(text, add_special_tokens=False)


def batch(tokenizer, texts, side="right"):
    """Anchor ids of texts, padded on `side` with 0."""
    rows = [encode(tokenizer, t) for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[r, cols], mask[r, cols] = torch.tensor(row), 1
    return ids, mask


def build(tokenizers, options: bool = False):
    """Anchor (BPE, 500) + augmenting 0 (Unigram, 300, its own tokenizer) + augmenting 1 (GPT-2, the
    anchor's tokenizer)."""
    anchor = tiny_model("llama", layers=4, width=64, heads=4, vocab=500, seed=0)
    own = tiny_model("llama", layers=4, width=32, heads=2, vocab=300, seed=1)
    shared = tiny_model("gpt2", layers=2, width=32, heads=2, vocab=500, seed=2)
    bpe, unigram = tokenizers["bpe"], tokenizers["unigram"]
    return compose(anchor, [own, shared], every_n=2, tokenizers=[bpe, unigram, None],
                   recency_bias=options, null_attention=options)


@pytest.fixture(scope="module", params=["paper", "recency_and_null"])
def trained(tokenizers, request):
    model = build(tokenizers, options=request.param == "recency_and_null")
    optimizer = torch.optim.Adam(model.composition_parameters(), lr=3e-2)
    model.train()
    for step in range(5):
        ids, mask = batch(tokenizers["bpe"], sample_texts(4, seed=100 + step))
        loss = model(ids, mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_the_tokenizers_are_real_and_split_words_differently(tokenizers):
    text = sample_texts(1, seed=7)[0]
    pieces = {name: t.convert_ids_to_tokens(t.encode(text, add_special_tokens=False)) for name, t in tokenizers.items()}
    assert len({len(p) for p in pieces.values()}) > 1 or len({tuple(p) for p in pieces.values()}) == 3
    assert all(1 < len(p) < len(text) for p in pieces.values())  # subwords: neither whole text nor characters
    for tokenizer in tokenizers.values():
        for sample in sample_texts(20, seed=8):
            check_whitespace_stable(tokenizer, sample)


def test_settled_tokens_end_before_the_last_whitespace(tokenizers):
    assert whitespace_boundaries("ab  cd e") == [0, 0, 0, 2, 2, 2, 2, 6, 6]
    unigram = tokenizers["unigram"]
    text = "kazu 12 + morilan"
    ids, visible = settled(unigram, text, [0, 3, 4, 5, len(text)])
    pieces = unigram.convert_ids_to_tokens(ids)
    assert pieces[0] == "<s>" and visible[:2] == [1, 1]  # before any whitespace: only BOS
    assert visible[2] == 1 and "".join(pieces[1:visible[3]]).replace("▁", "") == "kazu"  # settles at the space
    assert "".join(pieces[1:]).replace("▁", "") == "kazu12+"  # "morilan", the last word, never settles


def test_a_tokenizer_that_merges_across_whitespace_is_refused():
    spanning = spanning_tokenizer()
    with pytest.raises(AlignmentError, match="merges across whitespace"):
        for text in sample_texts(50, seed=9):
            check_whitespace_stable(spanning, text)


def test_a_tokenizer_without_offsets_is_refused(tokenizers):
    class Slow:
        is_fast = False
        name_or_path = "slow-one"

    with pytest.raises(AlignmentError, match="slow-one.*no character offsets"):
        Aligner(tokenizers["bpe"], [Slow()])


def test_untrained_composition_equals_anchor_bitwise(tokenizers):
    model = build(tokenizers)
    ids, mask = batch(tokenizers["bpe"], sample_texts(3, seed=11), side="left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = model.anchor(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(model(ids, mask).logits, plain)


def test_same_tokenizer_everywhere_is_the_shared_composition(tokenizers):
    anchor = tiny_model("llama", layers=4, width=64, heads=4, vocab=500, seed=0)
    aug = tiny_model("llama", layers=4, width=32, heads=2, vocab=500, seed=1)
    bpe = tokenizers["bpe"]
    assert compose(anchor, aug, every_n=2, tokenizers=[bpe, bpe]).aligner is None


@torch.no_grad()
def test_later_characters_never_change_earlier_logits(tokenizers, trained):
    bpe, unigram = tokenizers["bpe"], tokenizers["unigram"]
    assert not torch.equal(trained(*batch(bpe, ["mori lan 12"])).logits,
                           trained.anchor(*batch(bpe, ["mori lan 12"])).logits)
    hard_cases = composed_matters = 0
    for seed in range(6):
        prefix = sample_texts(1, seed=200 + seed)[0]
        cut = prefix[: len(prefix) - 2]  # usually inside a word, so the word's split depends on what follows
        endings = [prefix[len(cut):] + " kazu 7", "lanvorost + 3", " = 99 epi"]
        rows = [encode(bpe, cut + e) for e in endings]
        logits = [trained(torch.tensor([r])).logits[0] for r in rows]
        for row, other, out in zip(rows[1:], endings[1:], logits[1:], strict=True):
            common = 0
            while common < min(len(row), len(rows[0])) and row[common] == rows[0][common]:
                common += 1
            _, ends = anchor_text(bpe, rows[0], range(common))
            early = [t for t in range(common) if ends[t] <= len(cut)]
            torch.testing.assert_close(out[early], logits[0][early], rtol=0, atol=1e-6)
            plain = trained.anchor(torch.tensor([row])).logits[0]
            composed_matters += not torch.allclose(out[early], plain[early], atol=1e-4)
            # The case the naive rule gets wrong: how much of a prefix's augmenting tokenization agrees
            # with the whole text's depends on the characters after the cut.
            for t in early:
                head = unigram.encode(cut[: ends[t]], add_special_tokens=False)
                agree = [_common(head, unigram.encode(cut + e, add_special_tokens=False)) for e in (endings[0], other)]
                hard_cases += agree[0] != agree[1]
    assert hard_cases > 0 and composed_matters > 0


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def test_cached_decoding_equals_recomputation_over_32_steps(tokenizers, trained):
    bpe = tokenizers["bpe"]
    ids, mask = batch(bpe, ["kazu 12 + mori", "epi lan = 7 ; sha"], side="left")
    continuations = [bpe.encode(" " + t, add_special_tokens=False) for t in sample_texts(2, seed=31, words=(25, 30))]
    cache = trained.new_cache()
    step = ids
    for s in range(32):
        cached = trained(step, attention_mask=mask, cache=cache).logits[:, -1]
        full = trained(ids, attention_mask=mask).logits[:, -1]
        torch.testing.assert_close(cached, full, rtol=0, atol=1e-5, msg=f"step {s}")
        token = torch.tensor([[c[s]] for c in continuations])
        ids, mask, step = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1), token
    # The augmenting model ran only its settled tokens, each once: its cache is as long as they are.
    settled_now = [len(row.tokens[0]) for row in cache.rows]
    assert cache.augmenting[0].get_seq_length() == cache.augmenting_masks[0].shape[1] >= max(settled_now) > 10
    assert cache.augmenting_masks[0].sum(1).tolist() == settled_now


@torch.no_grad()
def test_generate_runs_across_tokenizers(tokenizers, trained):
    from calm_dist.model.decoding import generate

    ids, mask = batch(tokenizers["bpe"], ["kazu 12 + mori", "vor"], side="right")
    out = generate(trained, ids, mask, max_new_tokens=6)
    for r in range(2):
        seq = ids[r][mask[r].bool()][None]
        for _ in range(6):
            seq = torch.cat([seq, trained(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out[r, -6:], seq[0, -6:])


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_never_changes_logits(tokenizers, trained, side):
    texts = sample_texts(3, seed=41)
    ids, mask = batch(tokenizers["bpe"], texts, side=side)
    logits = trained(ids, mask).logits
    repadded = trained(ids.masked_fill(mask == 0, 77), mask).logits
    assert torch.equal(repadded[mask.bool()], logits[mask.bool()])
    for r, text in enumerate(texts):
        alone = trained(torch.tensor([encode(tokenizers["bpe"], text)])).logits[0]
        torch.testing.assert_close(logits[r][mask[r].bool()], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_precomputed_views_equal_views_from_the_anchor_ids(tokenizers, trained):
    from calm_dist.model.alignment import collate_views, views_from_batch

    bpe = tokenizers["bpe"]
    records = [{"input_ids": encode(bpe, t)} for t in sample_texts(3, seed=51)]
    for record in records:
        for k, (aug_ids, visible) in trained.aligner.align_ids(record["input_ids"]).items():
            record[f"augmenting{k}_input_ids"], record[f"augmenting{k}_visible"] = aug_ids, visible
    data = collate([{"input_ids": r["input_ids"]} for r in records], 0)
    data.update(collate_views(records, 2, [trained.aligner.pad_id(0), 0], data["input_ids"].shape[1]))
    views = views_from_batch(data, 2)
    assert views[1] is None
    from_data = trained(data["input_ids"], data["attention_mask"], augmenting_views=views).logits
    assert torch.equal(from_data, trained(data["input_ids"], data["attention_mask"]).logits)


def test_checkpoint_records_tokenizers_and_refuses_another(tokenizers, trained, tmp_path):
    bpe, unigram, wordpiece = tokenizers["bpe"], tokenizers["unigram"], tokenizers["wordpiece"]
    path = save_composition(trained, tmp_path / "composition")
    recorded = read_manifest(path)["tokenizers"]
    assert recorded["augmenting"][1] is None and recorded["augmenting"][0]["vocab_size"] == 300
    bases = (trained.anchor, list(trained.augmenting))

    # The same tokenizers, saved and loaded again from disk: the same model.
    unigram.save_pretrained(tmp_path / "unigram")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "unigram")
    again = load_composition(path, *bases, tokenizers=[bpe, reloaded, None])
    ids, mask = batch(bpe, sample_texts(2, seed=61))
    with torch.no_grad():
        assert torch.equal(again(ids, mask).logits, trained(ids, mask).logits)

    with pytest.raises(CompositionError, match="augmenting model 0 was trained with the tokenizer .* but is given"):
        load_composition(path, *bases, tokenizers=[bpe, wordpiece, None])
    with pytest.raises(CompositionError, match="trained across tokenizers .* pass tokenizers="):
        load_composition(path, *bases)
    shared = compose(tiny_model(vocab=500), tiny_model(width=32, heads=2, vocab=500, seed=1), every_n=2)
    shared_path = save_composition(shared, tmp_path / "shared")
    with pytest.raises(CompositionError, match="reading the anchor's tokens"):
        load_composition(shared_path, shared.anchor, list(shared.augmenting), tokenizers=[bpe, unigram])


# --------------------------------------------------------------------------------------------------
# Training config and pre-flight


def spanning_tokenizer():
    """A BPE with no pre-tokenizer: with enough merges, tokens span whitespace."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.decoder = decoders.BPEDecoder()
    backend.train_from_iterator(sample_texts(1500, seed=0), trainers.BpeTrainer(vocab_size=800, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def folders(tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross-preflight")
    tiny_model("llama", layers=4, width=64, heads=4, vocab=500, seed=0).save_pretrained(root / "anchor")
    tokenizers["bpe"].save_pretrained(root / "anchor")
    tiny_model("llama", layers=4, width=32, heads=2, vocab=300, seed=1).save_pretrained(root / "aug")
    tokenizers["unigram"].save_pretrained(root / "aug")
    tiny_model("llama", layers=4, width=32, heads=2, vocab=800, seed=1).save_pretrained(root / "aug800")
    tokenizers["bpe"].save_pretrained(root / "too-big")
    spanning_tokenizer().save_pretrained(root / "spanning")
    (root / "train.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in sample_texts(40, seed=9)))
    return root


def cross_config(folders, model="aug", composition=None, **aug):
    from launcher.train_config import TrainConfig

    return TrainConfig.model_validate({
        "name": "cross",
        "models": {"anchor": {"path": str(folders / "anchor")},
                   "augmenting": [{"path": str(folders / model), **aug}]},
        "composition": {"every_n": 2, **(composition or {})},
        "data": {"train": str(folders / "train.jsonl"), "text_field": "text"},
        "training": {"steps": 2, "micro_batch_size": 1, "global_batch_size": 2},
    })


def test_preflight_accepts_an_augmenting_model_with_its_own_tokenizer(folders):
    from launcher.preflight import describe, preflight
    from launcher.train_config import ConfigError

    with pytest.raises(ConfigError, match="vocabulary of 300 tokens but the anchor .* has 500"):
        preflight(cross_config(folders))
    report = preflight(cross_config(folders, tokenizer=str(folders / "aug")))
    assert report.own_tokenizers == (300,)
    assert "its own tokenizer (300 tokens)" in describe(report)


@pytest.mark.parametrize("folder, model, message", [
    ("too-big", "aug", r"^models\.augmenting\.0\.tokenizer: the tokenizer in .*too-big has 500 tokens but the model"),
    ("spanning", "aug800", r"^models\.augmenting\.0\.tokenizer: record \d+ of .*train.jsonl: .* merges across whitespace"),
    ("missing", "aug", r"^models\.augmenting\.0\.tokenizer: .*missing: no such folder"),
])
def test_preflight_refuses_an_unusable_own_tokenizer(folders, folder, model, message):
    from launcher.preflight import preflight
    from launcher.train_config import ConfigError

    with pytest.raises(ConfigError, match=message):
        preflight(cross_config(folders, model, tokenizer=str(folders / folder)))


def test_preflight_refuses_hiding_unknown_tokens_where_no_tokenizer_has_them(folders):
    from launcher.preflight import preflight
    from launcher.train_config import ConfigError

    hide = {"hide_unknown_tokens": True}
    assert preflight(cross_config(folders, composition=hide, tokenizer=str(folders / "aug"))).own_tokenizers == (300,)
    with pytest.raises(ConfigError, match=r"^composition\.hide_unknown_tokens: no augmenting model has a tokenizer"):
        preflight(cross_config(folders, "anchor", composition=hide))


def test_config_resolves_the_tokenizer_path_and_keeps_the_anchors_in_one_place(tmp_path):
    import yaml

    from launcher.train_config import ConfigError, load_config

    raw = {"name": "x", "models": {"anchor": {"path": "a"}, "augmenting": [{"path": "b", "tokenizer": "b/tok"}]},
           "data": {"train": "t.jsonl", "text_field": "text"},
           "training": {"steps": 1, "micro_batch_size": 1, "global_batch_size": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "c.yaml").models.augmenting[0].tokenizer == str(tmp_path / "b/tok")
    raw["models"]["anchor"]["tokenizer"] = "a"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="models.anchor.tokenizer"):
        load_config(tmp_path / "c.yaml")
