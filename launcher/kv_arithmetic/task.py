"""The key-value arithmetic task of the CALM paper (Table 1), small enough for a laptop.

A seeded map from keys (short lowercase strings, one token each) to values 0-9. Three skills:
- KV-substitution, the augmenting model's: `qzx+ab-mno:` -> `3+5-1`;
- numeric arithmetic, the anchor's: `3+5-1=` -> `7`;
- KV-arithmetic, the composition's: `qzx+ab-mno=` -> `7`, learned from examples over only
  `train_key_fraction` of the keys and evaluated on the keys it never saw.

Each task has its own prompt form (`:` asks for the values, `=` for the result), so one model can
score on every task: with one form, `qzx+ab-mno=` would expect `3+5-1` in one set and `7` in another.

The augmenting model also reads key-value streams (`qzx3ab5mno1`), in which each key is immediately
followed by its value, so that its state at a key predicts that key's value. Everything here is pure
data: which model trains on what, and the exact record sets, are decided by a seed.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# `=` ends an arithmetic prompt (the result follows), `:` a substitution prompt (the values follow).
SYMBOLS = list(string.digits) + ["+", "-", "=", ":"]


@dataclass(frozen=True)
class KVTask:
    keys: tuple[str, ...]
    values: dict[str, int]
    train_keys: tuple[str, ...]  # the keys D_C may use
    heldout_keys: tuple[str, ...]  # never in D_C
    seed: int


def make_task(seed: int, num_keys: int = 2000, train_key_fraction: float = 0.2, max_value: int = 9) -> KVTask:
    """Keys of 2-4 letters drawn without repetition, values uniform in 0..max_value."""
    rng = random.Random(f"kv-task-{seed}")
    keys: set[str] = set()
    while len(keys) < num_keys:
        keys.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 4))))
    ordered = sorted(keys)
    rng.shuffle(ordered)
    values = {k: rng.randint(0, max_value) for k in ordered}
    cut = round(num_keys * train_key_fraction)
    return KVTask(tuple(ordered), values, tuple(ordered[:cut]), tuple(ordered[cut:]), seed)


def kv_tokenizer(task: KVTask, spaced: bool = False) -> PreTrainedTokenizerFast:
    """Word-level: each key is one token, each digit and operator one token, no spaces needed.

    decode(encode(s)) == s for every string this task writes. `spaced`: for the task's strings written
    by `spaced`, spaces separate tokens and are not tokens, and decoding writes each token followed by
    one space (decode(encode(s)) == s + " "), so that the text of the tokens up to a key ends in
    whitespace: across tokenizers, an augmenting model's view of a word is seen from the anchor token
    whose text has whitespace after it (calm_dist.model.alignment), here the key's own token."""
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS.values(), *SYMBOLS, *sorted(task.keys)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    split = pre_tokenizers.Split(Regex(r"[a-z]+|\S"), behavior="isolated")
    if spaced:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), split])
        backend.decoder = decoders.Sequence([decoders.Replace(Regex("$"), " "), decoders.Fuse()])
    else:
        backend.pre_tokenizer = split
        backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=128,
                                   clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (space included), so a key is 2-4 tokens: an augmenting model with a
    tokenizer other than the anchor's. decode(encode(s)) == s."""
    characters = [" ", *SYMBOLS, *string.ascii_lowercase]
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS.values(), *characters])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=256,
                                   clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def spaced(text: str) -> str:
    """`qzx+ab=` -> `qzx + ab =`: keys, digits and operators separated by single spaces. Composition
    across tokenizers sees an augmenting token once whitespace follows its word (calm_dist.model.alignment),
    so the cross-tokenizer experiment writes its records this way."""
    return " ".join(re.findall(r"[a-z]+|\S", text))


def spaced_records(records: list[dict]) -> list[dict]:
    return [{field: spaced(value) for field, value in record.items()} for record in records]


def _expression(rng: random.Random, terms: list) -> str:
    ops = [rng.choice("+-") for _ in terms[1:]]
    return str(terms[0]) + "".join(op + str(t) for op, t in zip(ops, terms[1:], strict=True))


def evaluate_expression(expression: str) -> int:
    """The value of `a+b-c` over single-digit integers (no other syntax is written by this module)."""
    total, sign = 0, 1
    for char in expression:
        if char in "+-":
            sign = 1 if char == "+" else -1
        else:
            total += sign * int(char)
    return total


def substitute(task: KVTask, expression: str) -> str:
    """`qzx+ab` -> `3+5`: every key replaced by its value."""
    out, word = [], ""  # a key is a run of lowercase letters, as for the tokenizer
    for char in expression + " ":
        if char.islower():
            word += char
            continue
        if word:
            out.append(str(task.values[word]))
            word = ""
        if char != " ":
            out.append(char)
    return "".join(out)


def _key_expressions(task: KVTask, keys: tuple[str, ...], count: int, rng: random.Random,
                     terms: tuple[int, int]) -> list[str]:
    return [_expression(rng, rng.sample(keys, rng.randint(*terms))) for _ in range(count)]


def kv_arithmetic(task: KVTask, keys: tuple[str, ...], count: int, seed: int,
                  terms: tuple[int, int] = (2, 3)) -> list[dict]:
    """`qzx+ab-mno=` -> `7`, keys drawn from `keys`."""
    rng = random.Random(f"kv-arithmetic-{task.seed}-{seed}")
    return [{"prompt": e + "=", "completion": str(evaluate_expression(substitute(task, e)))}
            for e in _key_expressions(task, keys, count, rng, terms)]


def kv_substitution(task: KVTask, keys: tuple[str, ...], count: int, seed: int,
                    terms: tuple[int, int] = (2, 3)) -> list[dict]:
    """`qzx+ab-mno:` -> `3+5-1`."""
    rng = random.Random(f"kv-substitution-{task.seed}-{seed}")
    return [{"prompt": e + ":", "completion": substitute(task, e)}
            for e in _key_expressions(task, keys, count, rng, terms)]


def numeric_arithmetic(task: KVTask, count: int, seed: int, terms: tuple[int, int] = (2, 3),
                       max_value: int = 9) -> list[dict]:
    """`3+5-1=` -> `7`."""
    rng = random.Random(f"numeric-{task.seed}-{seed}")
    records = []
    for _ in range(count):
        e = _expression(rng, [rng.randint(0, max_value) for _ in range(rng.randint(*terms))])
        records.append({"prompt": e + "=", "completion": str(evaluate_expression(e))})
    return records


def kv_streams(task: KVTask, count: int, seed: int, pairs: int = 8, separator: str = "") -> list[dict]:
    """`qzx3ab5mno1...` (pairs joined by `separator`): keys from all of the map, each followed by its value."""
    rng = random.Random(f"kv-stream-{task.seed}-{seed}")
    return [{"text": separator.join(f"{k}{task.values[k]}" for k in rng.sample(task.keys, pairs))} for _ in range(count)]
