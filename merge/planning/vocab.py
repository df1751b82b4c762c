"""Vocabularies: whether the inputs' agree, and when they differ, the output's and where its rows come from.

Without a `tokenizer:` setting, inputs whose tokenizers map tokens to different ids (or whose embedding
row counts differ) are refused before any work: merging row i of one model with row i of another would
mix unrelated tokens. With one, every tensor whose first dimension is each model's vocab_size
(embeddings, output embeddings) is remapped row by row (VocabRows; merge/execution/vocab_rows.py):

- source union: the output's tokens are the base's (or first model's) with their ids, then every other
  model's tokens the base lacks, model by model in config order, each model's in id order. A token's row
  is the method over the models that have it; a token only one model has is that model's row.
- source base or a model's name: that model's tokenizer and ids. A model lacking one of its tokens
  contributes, for that row, `tokens_default`: zeros, the mean of the rows of the models that have it,
  or the base's (first model's) row; then the method runs over every model, as mergekit does.
Rows past the end of the output tokenizer's vocabulary (padding up to vocab_size) are the source's own.
A token whose id is at or past its model's vocab_size has no row there and counts as absent.

Vocabularies are read with the `tokenizers` library from tokenizer.json (no torch), or with
transformers' AutoTokenizer for folders without one; byte-identical tokenizer files are not parsed.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from merge.io.checkpoint_folder import Checkpoint
from merge.merge_config import MergeConfig
from merge.merge_errors import CheckpointError, ConfigError, IncompatibleInputsError

# Files a tokenizer is read from and written as (the output's replace the copied source's).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja")


@dataclass(frozen=True)
class VocabRows:
    """Where each row of an output vocabulary tensor comes from. Picklable, free of torch."""

    rows: int
    maps: tuple[tuple[int, ...], ...]  # per input: output row -> its row, -1 where it lacks the token
    fill: str | None  # None: union (each row over the inputs that have it); else tokens_default
    fill_from: int  # the input whose row `fill: base` takes
    padding: tuple[int, ...]  # output rows without a token: copied from input `padding_from`
    padding_from: int
    has_base: bool  # the method's first input is a base model (whose row a union fills when it lacks a token)

    def reordered(self, order: Sequence[int]) -> VocabRows:
        """The same rows with the inputs in `order` (the method's: base first)."""
        return VocabRows(self.rows, tuple(self.maps[i] for i in order), self.fill, order.index(self.fill_from),
                         self.padding, order.index(self.padding_from), self.has_base)


@dataclass(frozen=True)
class VocabPlan:
    rows: VocabRows
    sizes: tuple[int, ...]  # tokens in each input's tokenizer (with a row)
    added: tuple[str, ...]  # union: the tokens after the base's, in id order
    added_from: int  # the id of the first of them
    lacking: tuple[int, ...]  # per input: output tokens it lacks
    left_out: tuple[int, ...]  # per input: its tokens not in the output vocabulary
    files_from: int  # the input whose config and other files are copied

    def report(self, cfg: MergeConfig) -> dict[str, object]:
        assert cfg.tokenizer is not None
        return {
            "source": cfg.tokenizer.source, "tokens_default": cfg.tokenizer.tokens_default, "rows": self.rows.rows,
            "added_tokens": len(self.added),
            "inputs": {name: {"tokens": size, "lacking": lacking, "left_out": out}
                       for name, size, lacking, out in zip(cfg.names, self.sizes, self.lacking, self.left_out, strict=True)},
        }


def read_vocabulary(ckpt: Checkpoint) -> dict[str, int] | None:
    """token -> id of the model's tokenizer (added tokens included); None when its folder has none."""
    if (ckpt.path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(ckpt.path / "tokenizer.json")).get_vocab(with_added_tokens=True)
        except Exception as err:  # the Rust library's own exception type
            raise CheckpointError(f"{ckpt.path / 'tokenizer.json'}: not a readable tokenizer ({err})") from None
    if not any((ckpt.path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(ckpt.path).get_vocab())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"model '{ckpt.name}': {ckpt.path} holds a tokenizer transformers cannot read: "
                              f"{err}".replace("\n", " ")) from None


def _tokenizer_digest(ckpt: Checkpoint) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).is_file():
            digest.update(name.encode() + b"\0" + (ckpt.path / name).read_bytes())
    return digest.hexdigest()


def check_same_vocabulary(checkpoints: Sequence[Checkpoint], shared_rows: int | None = None) -> None:
    """Refuse inputs whose tokenizers give tokens different ids (those with ids below `shared_rows`
    only, under vocab_policy: truncate). Models without tokenizer files are not compared."""
    have = [c for c in checkpoints if any((c.path / name).is_file() for name in TOKENIZER_FILES)]
    if len({_tokenizer_digest(c) for c in have}) <= 1:
        return
    vocabs = [read_vocabulary(c) or {} for c in have]
    if shared_rows is not None:
        vocabs = [{t: i for t, i in v.items() if i < shared_rows} for v in vocabs]
    for ckpt, vocab in zip(have[1:], vocabs[1:], strict=True):
        if vocab != vocabs[0]:
            sizes = ", ".join(f"{c.name}: {len(v)}" for c, v in zip(have, vocabs, strict=True))
            token = next((t for t in sorted(set(vocab) ^ set(vocabs[0])) or
                          sorted(t for t in vocab if vocab[t] != vocabs[0][t])), None)
            raise IncompatibleInputsError(
                f"tokenizers differ: models '{have[0].name}' and '{ckpt.name}' give different vocabularies "
                f"(tokens: {sizes}; e.g. {token!r}), so their embedding rows do not match; set tokenizer: "
                "{source: union} to merge the union of their tokens, or tokenizer: {source: base, "
                "tokens_default: zero|mean|base} to keep the base's"
            )


def plan_vocabulary(cfg: MergeConfig, checkpoints: Sequence[Checkpoint]) -> VocabPlan:
    """The output vocabulary and every input's row of each of its tokens, as cfg.tokenizer says."""
    spec = cfg.tokenizer
    assert spec is not None
    base = cfg.vocab_base_index
    vocabs = []
    for ckpt in checkpoints:
        rows = ckpt.vocab_size
        if rows is None:
            raise CheckpointError(f"model '{ckpt.name}': {ckpt.path / 'config.json'} gives no vocab_size, which "
                                  "tokenizer needs to find the vocabulary tensors")
        vocab = read_vocabulary(ckpt)
        if vocab is None:
            raise CheckpointError(f"tokenizer: model '{ckpt.name}' has no tokenizer files in {ckpt.path}")
        vocabs.append({t: r for t, r in vocab.items() if r < rows})
    source = base if spec.source in ("union", "base") else cfg.index(spec.source)
    tokens = sorted(vocabs[source], key=vocabs[source].__getitem__)
    rows = checkpoints[source].vocab_size or 0
    added: list[str] = []
    if spec.source == "union":
        known = set(tokens)
        for vocab in vocabs[:source] + vocabs[source + 1:]:
            for token in sorted(vocab, key=vocab.__getitem__):
                if token not in known:
                    known.add(token)
                    added.append(token)
    ids = {t: r for t, r in vocabs[source].items()}
    first_new = max(ids.values(), default=-1) + 1
    ids |= {t: first_new + k for k, t in enumerate(added)}
    rows = max(rows, first_new + len(added))
    taken = set(ids.values())
    padding = tuple(r for r in range(rows) if r not in taken)
    maps = []
    for i, vocab in enumerate(vocabs):
        row = [-1] * rows
        for token, r in ids.items():
            row[r] = vocab.get(token, -1)
        for r in padding:
            row[r] = r if i == source else -1
        maps.append(tuple(row))
    if spec.tokens_default == "base" and base != source:
        missing = [t for t in vocabs[source] if t not in vocabs[base]]
        if missing:
            raise ConfigError(
                f"tokenizer.tokens_default: base takes rows from '{cfg.names[base]}', which lacks {len(missing)} "
                f"token(s) of '{cfg.names[source]}''s tokenizer (e.g. {missing[0]!r}); use zero or mean"
            )
    out_tokens = set(ids)
    return VocabPlan(
        VocabRows(rows, tuple(maps), spec.tokens_default, base, padding, source, cfg.base_index is not None),
        tuple(len(v) for v in vocabs), tuple(added), first_new,
        tuple(len(out_tokens - set(v)) for v in vocabs), tuple(len(set(v) - out_tokens) for v in vocabs),
        source,
    )


def tokenizer_files(plan: VocabPlan, checkpoints: Sequence[Checkpoint]) -> dict[str, bytes]:
    """The output's tokenizer files: the source's as they are, or for a union the base's tokenizer
    with the other models' tokens added after its own (as mergekit builds it: each as an added token,
    a model's special tokens keeping their settings). Checked to give every token its planned id."""
    source = checkpoints[plan.files_from]
    if not plan.added:
        return {name: (source.path / name).read_bytes() for name in TOKENIZER_FILES if (source.path / name).is_file()}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    specials = {}
    for ckpt in checkpoints:
        for added in AutoTokenizer.from_pretrained(ckpt.path).added_tokens_decoder.values():
            specials.setdefault(added.content, added)
    for token in plan.added:  # one at a time: ids in this order
        tokenizer.add_tokens([specials.get(token, token)])
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
    written = json.loads(files["tokenizer.json"]) if "tokenizer.json" in files else None
    if written is None:
        raise IncompatibleInputsError(f"tokenizer: the tokenizer of '{source.name}' cannot be saved as "
                                      "tokenizer.json, which a union is written as")
    from tokenizers import Tokenizer

    got = Tokenizer.from_str(json.dumps(written)).get_vocab(with_added_tokens=True)
    expected = {t: plan.added_from + k for k, t in enumerate(plan.added)}
    wrong = [t for t, r in expected.items() if got.get(t) != r]
    if wrong:
        raise IncompatibleInputsError(
            f"tokenizer: adding {len(plan.added)} token(s) to '{source.name}''s tokenizer gave {wrong[0]!r} the id "
            f"{got.get(wrong[0])}, not {expected[wrong[0]]}: its ids are not contiguous"
        )
    return files


def rows_bound(cfg: MergeConfig, checkpoints: Sequence[Checkpoint]) -> VocabRows:
    """For `calm plan` before the tokenizers are downloaded: the output's rows at most (a union: every
    model's vocab_size together; else the source's), with no maps: enough to size the memory."""
    assert cfg.tokenizer is not None
    sizes = [c.vocab_size or 0 for c in checkpoints]
    base = cfg.vocab_base_index
    source = base if cfg.tokenizer.source in ("union", "base") else cfg.index(cfg.tokenizer.source)
    rows = sum(sizes) if cfg.tokenizer.source == "union" else sizes[source]
    return VocabRows(rows, tuple(() for _ in checkpoints), cfg.tokenizer.tokens_default, base, (), source,
                     cfg.base_index is not None)


def remap_bytes(rows: VocabRows, input_shapes: Sequence[tuple[int, ...]], out_itemsize: int) -> int:
    """Memory a remapped tensor takes while it is merged whole: every input in fp32, each input's
    rows of the output (or of one group of tokens) in fp32, the result in fp32 and in the output dtype."""
    width = math.prod(input_shapes[0][1:])
    inputs = sum(shape[0] for shape in input_shapes) * width * 4
    return inputs + (len(input_shapes) + 1) * rows.rows * width * 4 + rows.rows * width * out_itemsize


def check_union_groups(cfg: MergeConfig, plan: VocabPlan) -> None:
    """Every group of tokens that two or more models share, but not all, is merged by the method over
    those models: refused where the method cannot take that many (nuslerp: exactly two)."""
    low, high = cfg.merge_method.model_count
    base = cfg.base_index
    seen = set()
    for row in range(plan.rows.rows):
        members = tuple(i for i, m in enumerate(plan.rows.maps) if m[row] >= 0)
        if len(members) < 2 or len(members) == len(cfg.models) or members in seen:
            continue
        seen.add(members)
        if cfg.merge_method.base_optional:
            count = len([i for i in members if i != base])
        else:  # a base lacking the tokens is stood in for by their mean (merge.execution.vocab_rows)
            count = len(members) + (base is not None and base not in members)
        if count < low or (high is not None and count > high):
            names = ", ".join(f"'{cfg.names[i]}'" for i in members)
            raise ConfigError(
                f"tokenizer: source union merges each token over the models that have it, and the tokens only "
                f"{names} have (e.g. row {row}) would need {cfg.method} to merge {count} model(s), which it cannot; "
                "use tokenizer source base or a model's name, with tokens_default"
            )
