"""Full fine-tuning of the base model on one task: a plain single-process loop, the way the "given"
fine-tunes of LM-Cocktail's setting were made. Every weight trains (AdamW), on whole sequences (prompt
and answer), long enough that the model forgets some of what it knew. Cached: a finished fine-tune is
a folder with a stamp naming its settings, and a rerun with the same settings skips it.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from calm_dist.errors import InputError
from launcher.lm_cocktail.tasks import Example

STAMP = "finetune.json"  # written last: a folder without it is not finished


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 160
    batch_size: int = 8
    learning_rate: float = 8e-5
    seed: int = 0  # the order of the examples


def finetune(base: Path, examples: list[Example], settings: FinetuneSettings, out: Path,
             log: Callable[[str], None]) -> Path:
    """`base` fine-tuned on `examples` into `out` (fp32 safetensors, config, tokenizer); returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_finished(out, base, settings):
        log(f"fine-tune {out.name}: cached")
        return out
    if out.exists() and not (out / STAMP).is_file():
        raise InputError(f"{out}: exists but holds no fine-tune of ours ({STAMP} missing); move it or pick another --root")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    order = random.Random(settings.seed)
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        batch = order.sample(examples, settings.batch_size)
        encoded = tokenizer([e.prompt + e.answer for e in batch], return_tensors="pt", padding=True)
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == settings.steps:
            log(f"fine-tune {out.name}: step {step}/{settings.steps}  loss {loss.item():.4f}  "
                f"{time.perf_counter() - started:.0f} s")
    # Written beside, then renamed: `out` is never half a model.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    stamp = {"identity": _identity(base, settings), "wall_s": time.perf_counter() - started}
    (partial / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)  # ours (it has our stamp), made with other settings
    partial.rename(out)
    return out


def _identity(base: Path, settings: FinetuneSettings) -> dict:
    # The seed fixes the examples (tasks.make_tasks) as well as their order.
    return {"base": str(base), "settings": asdict(settings)}


def is_finished(out: Path, base: Path, settings: FinetuneSettings) -> bool:
    """Whether `out` holds a finished fine-tune of `base` with these settings."""
    stamp = out / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("identity") == _identity(base, settings)
