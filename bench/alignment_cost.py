"""Cost of composing across tokenizers: one training step with an augmenting model that reads the text
through its own tokenizer, against the same step with a shared tokenizer, same anchor batch, on CPU.

Shared: the augmenting model (vocabulary = the anchor's) reads the anchor's token ids; causal mask.
Cross: the same-size augmenting model reads its own Unigram tokens of the text, and each anchor position
sees only its settled tokens (calm_dist.model.alignment). As in `calm train`, the data pipeline aligns each
record once (tokenize_records); the step gets the tokens and visibility precomputed. Both tokenizers
are trained here on generated text (byte-level BPE for the anchor, Unigram for the augmenting model).

Also printed: the one-time alignment per record (data pipeline), and aligning a batch on the fly from
anchor ids (what a forward without precomputed views does: evaluation, generation).

    .venv/bin/python bench/alignment_cost.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from compose_overhead import timed_interleaved  # bench/ is on sys.path when a bench script runs

from calm_dist.data.batches import collate
from calm_dist.model.alignment import collate_views, views_from_batch
from calm_dist.model.composed import compose
from calm_dist.testing.tiny_models import tiny_model
from calm_dist.testing.tokenizers import sample_texts, trained_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor", default="8x512", help="layers x width")
    parser.add_argument("--augmenting", default="4x256", help="layers x width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256, help="anchor tokens per row")
    parser.add_argument("--every-n", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    texts = sample_texts(3000, seed=0)
    anchor_tokenizer = trained_tokenizer("bpe", texts, 500)
    own_tokenizer = trained_tokenizer("unigram", texts, 300)
    (la, wa), (lb, wb) = (map(int, s.split("x")) for s in (args.anchor, args.augmenting))
    anchor = tiny_model("llama", layers=la, width=wa, heads=wa // 64, vocab=len(anchor_tokenizer), seed=0)
    shared_aug = tiny_model("llama", layers=lb, width=wb, heads=wb // 64, vocab=len(anchor_tokenizer), seed=1)
    own_aug = tiny_model("llama", layers=lb, width=wb, heads=wb // 64, vocab=len(own_tokenizer), seed=1)
    shared = compose(anchor, shared_aug, every_n=args.every_n).train()
    cross = compose(anchor, own_aug, every_n=args.every_n, tokenizers=[anchor_tokenizer, own_tokenizer]).train()
    # Same initial composition weights: the two differ only in what the augmenting model reads.
    cross.composition.load_state_dict(shared.composition.state_dict())

    long_texts = [" ".join(sample_texts(12, seed=100 + r, words=(10, 12))) for r in range(args.batch)]
    rows = [[1] + anchor_tokenizer.encode(t, add_special_tokens=False)[: args.length - 1] for t in long_texts]
    records = [{"input_ids": r} for r in rows]
    start = time.perf_counter()
    for record in records:
        for k, (ids, visible) in cross.aligner.align_ids(record["input_ids"]).items():
            record[f"augmenting{k}_input_ids"], record[f"augmenting{k}_visible"] = ids, visible
    per_record = (time.perf_counter() - start) / len(records)
    batch = collate([{"input_ids": r} for r in rows], 0)
    batch.update(collate_views(records, 1, [cross.aligner.pad_id(0)], batch["input_ids"].shape[1]))
    views = views_from_batch(batch)
    ids = batch["input_ids"]

    def shared_step():
        shared.composition.zero_grad(set_to_none=True)
        shared(ids, labels=ids).loss.backward()

    def cross_step():
        cross.composition.zero_grad(set_to_none=True)
        cross(ids, labels=ids, augmenting_views=views).loss.backward()

    def align_on_the_fly():
        cross.aligner.step(ids, torch.ones_like(ids), ids.shape[1], None)

    t = timed_interleaved({"shared": shared_step, "cross": cross_step, "align": align_on_the_fly}, args.repeats)
    ratio = t["cross"] / t["shared"]
    print(json.dumps({
        "anchor": args.anchor, "augmenting": args.augmenting, "batch": list(ids.shape),
        "tokenizers": {"anchor": f"byte-level BPE, {len(anchor_tokenizer)} tokens",
                       "augmenting": f"Unigram (Metaspace), {len(own_tokenizer)} tokens"},
        "augmenting_tokens_per_row": views[0].attention_mask.sum(1).tolist(),
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg()[0],
        "shared_step_s": round(t["shared"], 4),
        "cross_step_s": round(t["cross"], 4),
        "ratio": round(ratio, 4),
        "target_ratio": 1.10,
        "target_met": ratio <= 1.10,
        "align_per_record_once_s": round(per_record, 5),
        "align_batch_on_the_fly_s": round(t["align"], 4),
        "align_on_the_fly_vs_shared_step": round(t["align"] / t["shared"], 4),
    }, indent=2))


if __name__ == "__main__":
    main()
