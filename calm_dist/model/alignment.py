"""Cross-tokenizer composition: which augmenting states each anchor position may see.

The text is the common ground. The anchor reads it as its token ids; the text of anchor tokens 0..t
is `decode(ids[:t+1])` (special tokens skipped), the same function in training and decoding. Each
augmenting model with a tokenizer of its own reads that text through its tokenizer (a fast one, for
the character offsets), with its own BOS in front.

Settled tokens. An augmenting token is settled in a text when it ends at or before the start of the
text's last whitespace run: the words before that run are complete, and a tokenizer that never merges
across whitespace (byte-level BPE with a regex split, Metaspace, WordPiece, SentencePiece with its
default whitespace split) tokenizes them the same whatever text follows. Anchor position t sees
exactly the settled tokens of text[:end of anchor token t] (BOS is always settled); the unsettled tail
is never computed. Both the set and the states depend only on that prefix, so the composed logits of
position t never depend on a later character, and one augmenting forward over the settled tokens of
the whole text gives every position its states, in training and decoding alike.

(Comparing the prefix's tokenization with the *full* text's, and seeing their common prefix, is not
causal: how much of the prefix's tokenization survives depends on what follows, e.g. "he|l" survives
in "help" but not in "hello" for a BPE that has "hello".)

`check_whitespace_stable` verifies the premise on given texts (preflight runs it on the data);
decoding verifies it at every step, since its cache holds the settled tokens of the previous text.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from calm_dist.errors import CompositionError


class AlignmentError(CompositionError):
    """A tokenizer that cannot take part in cross-tokenizer composition, or text it cannot align."""


REPLACEMENT = "\ufffd"  # what decode shows for the bytes of a character not yet complete


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict:
    """What identifies a tokenizer in a checkpoint: its name, size and a hash of its full definition
    (vocabulary, merges, normalizer, pre-tokenizer, special tokens)."""
    if tokenizer.is_fast:
        # Truncation and padding are per-call settings the wrapper leaves on the backend, not identity.
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        backend.pop("truncation", None)
        backend.pop("padding", None)
        definition = json.dumps(backend, sort_keys=True)
    else:
        definition = repr(sorted(tokenizer.get_vocab().items()))
    specials = repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()))
    return {
        "name": tokenizer.name_or_path or "",
        "vocab_size": len(tokenizer),
        "sha256": hashlib.sha256((definition + specials).encode()).hexdigest(),
    }


def require_offsets(tokenizer: PreTrainedTokenizerBase, role: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise AlignmentError(
            f"the {role} tokenizer ({type(tokenizer).__name__}, {tokenizer.name_or_path!r}) is not a fast "
            "tokenizer and gives no character offsets; cross-tokenizer composition needs one "
            "(load it with AutoTokenizer.from_pretrained(..., use_fast=True) or convert it to tokenizer.json)"
        )


def whitespace_boundaries(text: str) -> list[int]:
    """boundary[e] for e in 0..len(text): the start of the last whitespace run in text[:e] (0 if none)."""
    boundary = [0] * (len(text) + 1)
    last, run_start = 0, None
    for i, char in enumerate(text):
        if char.isspace():
            if run_start is None:
                run_start = i
                last = i
        else:
            run_start = None
        boundary[i + 1] = last
    return boundary


def anchor_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], positions: Sequence[int]) -> tuple[str, list[int]]:
    """The text of anchor tokens `ids`, and the end (in characters) of the text of ids[:p+1] for each p.

    A trailing incomplete character (a byte-level token that holds only part of it) is not text yet.
    AlignmentError if the decoded prefixes do not extend one another.
    """
    def text_of(n: int) -> str:
        return tokenizer.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip(REPLACEMENT)

    text = text_of(len(ids))
    ends = []
    for p in positions:
        prefix = text_of(p + 1)
        if not text.startswith(prefix):
            raise AlignmentError(
                f"the anchor tokenizer decodes tokens 0..{p} to {prefix[-40:]!r}, which the decoded text of "
                f"the longer sequence does not start with ({text[:len(prefix)][-40:]!r}): its decoding is not "
                "prefix-stable, so the text cannot be aligned"
            )
        ends.append(len(prefix))
    return text, ends


def settled(tokenizer: PreTrainedTokenizerBase, text: str, ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """(ids, visible): the augmenting tokenizer's settled tokens of `text` that some end in `ends` sees
    (BOS first), and for each end e the number of them the text[:e] settles."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    token_ends, high = [0] * len(bos), 0
    for _, end in encoded["offset_mapping"]:
        high = max(high, end)
        token_ends.append(high)
    boundary = whitespace_boundaries(text)
    visible = [bisect.bisect_right(token_ends, boundary[e]) for e in ends]
    count = max(visible, default=len(bos))
    return (bos + list(encoded["input_ids"]))[:count], visible


def check_whitespace_stable(tokenizer: PreTrainedTokenizerBase, text: str, where: str = "text") -> None:
    """AlignmentError unless, for every prefix of `text`, its settled tokens are those of the whole text.
    Costs one tokenization per character: for preflight and tests, on a few texts."""
    ends = list(range(len(text) + 1))
    full, visible = settled(tokenizer, text, ends)
    prefixes = [text[:e] for e in ends]
    encoded = tokenizer(prefixes, add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for e, ids in zip(ends, encoded, strict=True):
        if (bos + list(ids))[: visible[e]] != full[: visible[e]]:
            raise AlignmentError(
                f"{where}: the tokenizer {tokenizer.name_or_path!r} tokenizes the words before the last "
                f"whitespace of {text[:e][-40:]!r} differently once more text follows: it merges across "
                "whitespace, so its settled tokens are not final and it cannot be composed across tokenizers"
            )


def uninformative_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that say nothing of the text: the unknown token (what text the tokenizer has no token for
    encodes to) and the bos token (the same at the start of every row); [] when the tokenizer has no
    unknown token of its own (a byte-level tokenizer's `unk` is often its eos, which is real input)."""
    unknown = tokenizer.unk_token_id
    if unknown in (None, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        return []
    return [unknown] if tokenizer.bos_token_id is None else [unknown, tokenizer.bos_token_id]


@dataclass
class AugmentingView:
    """One augmenting model's input for a forward: its new settled tokens, and what each anchor
    position may see.

    input_ids, attention_mask: [batch, n] the augmenting tokens to run (after those already cached),
    0 in the mask where a row has fewer; visible: [batch, length] for each new anchor position, how
    many of the row's real augmenting tokens (counted from its first, cached ones included) it sees.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    visible: torch.Tensor

    def to(self, device: torch.device) -> AugmentingView:
        return AugmentingView(self.input_ids.to(device), self.attention_mask.to(device), self.visible.to(device))


@dataclass
class RowState:
    """Decoding state of one row: its text so far and each augmenting model's settled tokens."""

    text: str = ""
    tokens: list[list[int]] = field(default_factory=list)


def settled_mask(augmenting_mask: torch.Tensor, visible: torch.Tensor, readable: torch.Tensor | None = None) -> torch.Tensor:
    """bool [batch, 1, length, aug_len]: query t sees real augmenting position s iff s is among the
    row's first visible[t] real tokens (and readable, where given: bool [batch, aug_len])."""
    real = augmenting_mask.bool()
    order = augmenting_mask.long().cumsum(-1) - 1
    seen = real if readable is None else real & readable
    return (seen[:, None, :] & (order[:, None, :] < visible[:, :, None]))[:, None]


def batch_key(k: int, name: str) -> str:
    """Key of augmenting model k's tensors in a data batch (`input_ids`, `attention_mask`, `visible`)."""
    return f"augmenting{k}_{name}"


def views_from_batch(batch: dict, count: int | None = None) -> list[AugmentingView | None] | None:
    """The views a collated batch carries (data pipeline or Aligner.extend_batch), or None for none.
    count: the number of augmenting models (default: as many as the batch's keys name)."""
    if count is None:
        found = [int(key[len("augmenting"):-len("_input_ids")]) for key in batch
                 if key.startswith("augmenting") and key.endswith("_input_ids")]
        count = max(found, default=-1) + 1
    views = [
        AugmentingView(batch[batch_key(k, "input_ids")], batch[batch_key(k, "attention_mask")], batch[batch_key(k, "visible")])
        if batch_key(k, "input_ids") in batch else None
        for k in range(count)
    ]
    return views if any(v is not None for v in views) else None


class Aligner:
    """The tokenizers of a composition. Augmenting model k reads the anchor's token ids when its
    tokenizer is None or the anchor's own (shared, as without an aligner); otherwise the text."""

    def __init__(self, anchor: PreTrainedTokenizerBase, augmenting: Sequence[PreTrainedTokenizerBase | None]):
        self.anchor = anchor
        own = [t is not None and t is not anchor for t in augmenting]
        if any(own):
            require_offsets(anchor, "anchor")
        for k, tokenizer in enumerate(augmenting):
            if own[k]:
                require_offsets(tokenizer, f"augmenting model {k}")
        anchor_hash = tokenizer_identity(anchor)["sha256"] if any(own) else None
        # A tokenizer equal to the anchor's (another copy of it) reads the anchor's ids, as without one.
        self.augmenting: list[PreTrainedTokenizerBase | None] = [
            t if own[k] and tokenizer_identity(t)["sha256"] != anchor_hash else None for k, t in enumerate(augmenting)
        ]

    @property
    def cross(self) -> list[int]:
        """Indices of the augmenting models that read through a tokenizer of their own."""
        return [k for k, t in enumerate(self.augmenting) if t is not None]

    def identities(self) -> dict:
        return {
            "anchor": tokenizer_identity(self.anchor),
            "augmenting": [None if t is None else tokenizer_identity(t) for t in self.augmenting],
        }

    def uninformative_ids(self) -> dict[int, torch.Tensor]:
        """Cross-tokenizer model k -> its tokenizer's uninformative_ids, for those that have an unknown token."""
        ids = {k: uninformative_ids(self.augmenting[k]) for k in self.cross}
        return {k: torch.tensor(found) for k, found in ids.items() if found}

    def pad_id(self, k: int) -> int:
        tokenizer = self.augmenting[k]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pad if pad is not None else 0

    def align_ids(self, ids: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]:
        """For one unpadded row of anchor ids: augmenting model k -> (settled ids, visible per position).
        The data pipeline stores these; a forward without a cache computes the same."""
        if not self.cross:
            return {}
        text, ends = anchor_text(self.anchor, ids, range(len(ids)))
        return {k: settled(self.augmenting[k], text, ends) for k in self.cross}

    def step(
        self,
        all_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        length: int,
        states: list[RowState] | None,
    ) -> list[AugmentingView | None]:
        """Views for a forward over the last `length` columns of all_ids [batch, past + length], whose
        attention_mask covers every column. states: per row, what a decoding cache already holds (the
        text and the settled tokens so far), updated in place; None for a forward without a cache."""
        batch, total = all_ids.shape
        device = all_ids.device
        new_tokens: dict[int, list[list[int]]] = {k: [] for k in self.cross}
        visible = {k: torch.zeros(batch, length, dtype=torch.long) for k in self.cross}
        mask = attention_mask.bool().cpu()
        ids_cpu = all_ids.cpu()
        for row in range(batch):
            real = mask[row].nonzero().flatten().tolist()
            ids = ids_cpu[row, real].tolist()
            new_positions = [(i, c - (total - length)) for i, c in enumerate(real) if c >= total - length]
            state = states[row] if states is not None else RowState(tokens=[[] for _ in self.augmenting])
            if not new_positions:
                for k in self.cross:
                    new_tokens[k].append([])
                continue
            text, ends = anchor_text(self.anchor, ids, [i for i, _ in new_positions])
            if not text.startswith(state.text):
                raise AlignmentError(
                    f"row {row}: the anchor's decoded text changed before its end ({state.text[-40:]!r} became "
                    f"{text[:len(state.text)][-40:]!r}); its decoding is not prefix-stable"
                )
            state.text = text
            for k in self.cross:
                tokens, seen = settled(self.augmenting[k], text, ends)
                cached = state.tokens[k]
                if tokens[: len(cached)] != cached:
                    raise AlignmentError(
                        f"augmenting model {k}: its tokenizer ({self.augmenting[k].name_or_path!r}) re-tokenized "
                        f"settled words of {text[-60:]!r} once more text followed; it merges across "
                        "whitespace and cannot be composed across tokenizers"
                    )
                new = tokens[len(cached):]
                cached.extend(new)
                new_tokens[k].append(new)
                for (_, column), count in zip(new_positions, seen, strict=True):
                    visible[k][row, column] = count
        views: list[AugmentingView | None] = [None] * len(self.augmenting)
        for k in self.cross:
            width = max(len(t) for t in new_tokens[k])
            ids = torch.full((batch, width), self.pad_id(k), dtype=torch.long)
            new_mask = torch.zeros(batch, width, dtype=torch.long)
            for row, tokens in enumerate(new_tokens[k]):
                ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                new_mask[row, : len(tokens)] = 1
            views[k] = AugmentingView(ids, new_mask, visible[k]).to(device)
        return views

    def extend_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with each cross-tokenizer model's view added under batch_key(k, ...) (evaluation
        and greedy decoding build batches from anchor ids alone)."""
        views = self.step(batch["input_ids"], batch["attention_mask"], batch["input_ids"].shape[1], None)
        out = dict(batch)
        for k, view in enumerate(views):
            if view is not None:
                out[batch_key(k, "input_ids")] = view.input_ids
                out[batch_key(k, "attention_mask")] = view.attention_mask
                out[batch_key(k, "visible")] = view.visible
        return out


def collate_views(examples: Sequence[dict], count: int, pad_ids: Sequence[int], length: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of the augmenting tokens and visibility the data pipeline stored per record."""
    out: dict[str, torch.Tensor] = {}
    for k in range(count):
        key = batch_key(k, "input_ids")
        if key not in examples[0]:
            continue
        width = max(len(e[key]) for e in examples)
        ids = torch.full((len(examples), width), pad_ids[k], dtype=torch.long)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        visible = torch.zeros(len(examples), length, dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example[key])
            ids[row, :n] = torch.as_tensor(example[key], dtype=torch.long)
            mask[row, :n] = 1
            seen = example[batch_key(k, "visible")]
            visible[row, : len(seen)] = torch.as_tensor(seen, dtype=torch.long)
        out[key], out[batch_key(k, "attention_mask")], out[batch_key(k, "visible")] = ids, mask, visible
    return out
