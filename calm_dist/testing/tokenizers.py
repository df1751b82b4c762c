"""Tokenizers built in memory, for the tiny models of calm_dist.testing.tiny_models: a character-level one, and
subword ones trained on generated text (for cross-tokenizer composition).

Nothing can be downloaded in tests or the demo, so the tokenizer is built here rather than fetched.
One character is one token, which keeps arithmetic-style toy data (`12+7=19`) exactly reversible.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Ids 0, 1, 2 are the pad, bos and eos ids of every config in calm_dist.testing.tiny_models.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Characters in order of priority: a vocabulary smaller than the whole charset keeps a prefix, and the
# prefix up to `+-*=` is the least any vocabulary must hold (enough for arithmetic and plain words).
REQUIRED_CHARS = string.digits + string.ascii_lowercase + " " + "+-*="
_OTHER_PUNCTUATION = "".join(c for c in string.punctuation if c not in "+-*=:;,.?!'\"()")
CHARSET = REQUIRED_CHARS + ":;,.?!'\"()" + string.ascii_uppercase + "\n" + _OTHER_PUNCTUATION + "\t"

# The tiny configs use 512 positions; a longer input could not run through them anyway.
MODEL_MAX_LENGTH = 512


def tiny_tokenizer(vocab_size: int = 128, *, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A tokenizer with exactly `vocab_size` ids: 4 special tokens, then as much of CHARSET as fits.

    Ids left over after the charset are reserved (`<extra_0>`, ...): no text encodes to them, but a
    model with that vocabulary may still generate them, and they must decode to something. Characters
    outside the vocabulary encode to `<unk>`. No special token is added on encoding, so
    `decode(encode(s)) == s` for any string over the vocabulary's characters; the data pipeline adds
    bos and eos itself.
    """
    charset = CHARSET[: max(0, vocab_size - len(SPECIAL_TOKENS))]
    if len(charset) < len(REQUIRED_CHARS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the tiny tokenizer needs {len(SPECIAL_TOKENS)} special "
            f"tokens and at least {len(REQUIRED_CHARS)} characters ({REQUIRED_CHARS!r}), "
            f"so vocab_size >= {len(SPECIAL_TOKENS) + len(REQUIRED_CHARS)}"
        )
    reserved = [f"<extra_{i}>" for i in range(vocab_size - len(SPECIAL_TOKENS) - len(charset))]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *charset, *reserved])}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Every character, newline included, becomes its own word; multi-character vocabulary entries
    # (the reserved ids) can therefore never match text.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side=padding_side,
        model_max_length=MODEL_MAX_LENGTH,
        # The default clean-up would delete the space in "a ." and break decode(encode(s)) == s.
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


# --------------------------------------------------------------------------------------------------
# Subword tokenizers trained here, for cross-tokenizer composition in tests, benchmarks and demos


def trained_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A real subword tokenizer trained on `texts` with the `tokenizers` library (no download).

    kind: "bpe" (byte-level BPE with a GPT-2 style regex split, spaces attached to the next word),
    "unigram" (SentencePiece-style Unigram with a Metaspace pre-tokenizer) or "wordpiece" (BERT-style,
    whitespace and punctuation split). Ids 0..3 are <pad>, <s>, </s>, <unk>, as in tiny_tokenizer.
    """
    specials = list(SPECIAL_TOKENS.values())
    if kind == "bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "unigram":
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          unk_token=SPECIAL_TOKENS["unk_token"], show_progress=False)
    elif kind == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose bpe, unigram or wordpiece")
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=MODEL_MAX_LENGTH,
                                   clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


_SYLLABLES = ("ka", "zu", "mo", "ri", "te", "lan", "vor", "qis", "bel", "dro", "sha", "nix", "ul", "epi", "ost")


def sample_texts(count: int, seed: int = 0, words: tuple[int, int] = (3, 12)) -> list[str]:
    """Generated text: made-up words, numbers and arithmetic, so that subword tokenizers learn merges
    that split words differently from one another."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(*words)):
            roll = rng.random()
            if roll < 0.6:
                pieces.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
            elif roll < 0.8:
                pieces.append(str(rng.randint(0, 999)))
            else:
                pieces.append(rng.choice("+-*=.,:;?"))
        texts.append(" ".join(pieces))
    return texts
