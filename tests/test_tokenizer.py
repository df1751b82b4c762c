"""The in-memory character tokenizer: fixed special ids, exact round trips, save and reload."""

import pytest
from transformers import AutoTokenizer

from calm_dist.testing.tiny_models import tiny_config
from calm_dist.testing.tokenizers import CHARSET, REQUIRED_CHARS, tiny_tokenizer

TEXT = "what is 12+7*3? it is 33.\nOK: (a-b)=c, \"quoted\" [x]\t~end"


def test_special_ids_match_the_tiny_model_configs():
    tok = tiny_tokenizer()
    config = tiny_config("llama")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.mark.parametrize("vocab_size", [45, 64, 101, 128, 256])
def test_vocabulary_has_exactly_vocab_size_distinct_ids(vocab_size):
    tok = tiny_tokenizer(vocab_size)
    assert len(tok) == vocab_size
    assert sorted(tok.get_vocab().values()) == list(range(vocab_size))
    # Every id decodes to something, reserved ones included, so sampling any id is safe.
    assert all(tok.decode([i]) for i in range(4, vocab_size))


def test_every_character_is_one_token_and_decoding_is_exact():
    tok = tiny_tokenizer()
    ids = tok(TEXT)["input_ids"]
    assert len(ids) == len(TEXT), "one token per character, no special token added"
    assert ids[:3] == [tok.convert_tokens_to_ids(c) for c in "wha"]
    assert tok.decode(ids) == TEXT
    assert tok.decode(tok(CHARSET)["input_ids"]) == CHARSET
    assert 3 not in tok(CHARSET)["input_ids"], "the whole charset fits in 128 ids"


def test_small_vocabulary_keeps_the_required_characters_and_maps_the_rest_to_unk():
    tok = tiny_tokenizer(45)
    assert tok.decode(tok(REQUIRED_CHARS)["input_ids"]) == REQUIRED_CHARS
    # 4 specials, then digits (4..13), lowercase (14..39), space (40), "+-*=" (41..44); "Q" is unknown.
    assert tok("1+x=Q")["input_ids"] == [5, 41, 37, 44, 3]
    assert tok.decode(tok("A?")["input_ids"]) == "<unk><unk>"


def test_too_small_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size=44 is too small.*vocab_size >= 45"):
        tiny_tokenizer(44)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_survives_save_and_autotokenizer_reload(tmp_path, side):
    tok = tiny_tokenizer(padding_side=side)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == side
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert loaded.decode(loaded(TEXT)["input_ids"]) == TEXT

    batch = loaded(["ab", "abcd"], padding=True)
    a, b = (loaded.convert_tokens_to_ids(c) for c in "ab")
    short = [a, b, 0, 0] if side == "right" else [0, 0, a, b]
    assert batch["input_ids"][0] == short
    assert batch["attention_mask"][0] == [int(t != 0) for t in short]
