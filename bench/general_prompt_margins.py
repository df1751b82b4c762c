"""How sure SmolLM2-135M-Instruct is of its first answer token to each general prompt (issue #23's
general exact match, launcher.general_ability): the log-probability margin between its top token and the
runner-up at the first position it generates, as `calm eval`'s decoding loop feeds the prompt (bos first).
A composition that moves the anchor's logits by less than that margin cannot change the greedy answer;
prompts with a small margin are the ones any change of the anchor flips. Prints one JSON object, prompts
from the least sure; `right`: the greedy completion's first word is the answer, as scored. A few seconds.

    .venv/bin/python bench/general_prompt_margins.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@torch.no_grad()
def main() -> None:
    from calm_dist.model.decoding import SingleModel, complete, prompt_ids
    from calm_dist.testing.real_checkpoint import smollm2
    from launcher.general_ability import ALL_GENERAL_PROMPTS, first_word
    from launcher.real_anchor.experiment import _load

    model, tokenizer = _load(smollm2())  # as the experiment loads m_B (fp32)
    prompts = [p for p, _ in ALL_GENERAL_PROMPTS]
    completions = complete(SingleModel(model), tokenizer, prompts, max_new_tokens=4, batch_size=16)
    rows = []
    for (prompt, answer), completion, ids in zip(ALL_GENERAL_PROMPTS, completions, prompt_ids(tokenizer, prompts),
                                                 strict=True):
        log_p = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        top = log_p.topk(2)
        rows.append({"prompt": prompt, "answer": answer, "completion": completion,
                     "right": first_word(completion) == answer.lower(),
                     "top": tokenizer.decode(top.indices[0]), "runner_up": tokenizer.decode(top.indices[1]),
                     "p_top": round(top.values[0].exp().item(), 3),
                     "margin_nats": round((top.values[0] - top.values[1]).item(), 3)})
    rows.sort(key=lambda row: row["margin_nats"])
    right = [row for row in rows if row["right"]]
    summary = {"prompts": len(rows), "right": len(right),
               **{f"right_with_margin_below_{m}": sum(row["margin_nats"] < m for row in right) for m in (0.5, 1, 2)}}
    print(json.dumps({**summary, "by_margin": rows}, ensure_ascii=False))


if __name__ == "__main__":
    main()
