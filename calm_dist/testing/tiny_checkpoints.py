"""Tiny seeded checkpoints for a first merge on any machine, with no downloads:

    python -m calm_dist.testing.tiny_checkpoints runs/cocktail-demo
    calm merge configs/cocktail-tiny.yaml

writes a 2-layer Llama base model, two "fine-tunes" of it (the base plus seeded task vectors of
different sizes, saved in shards), a character tokenizer without a pad token, and a few input/output
examples. The tests build their inputs with the same functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PRINTABLE = [chr(c) for c in range(32, 127)]
VOCAB = 3 + len(PRINTABLE)  # <unk>, <s>, </s>, then printable ASCII
EXAMPLES = [
    ("12+7=", "19"), ("40+2=", "42"), ("9*3=", "27"), ("100-1=", "99"), ("6*7=", "42"),
]


def char_tokenizer(folder: Path) -> None:
    """One token per character, a BOS token, and no pad token (as many decoders)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(PRINTABLE)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def tiny_llama(
    folder: Path,
    seed: int,
    *,
    vocab: int = VOCAB,
    tie: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    shard_size: str | None = None,
    tokenizer: bool = True,
    scale: float = 1.0,
    delta_of: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """A seeded 2-layer Llama saved as safetensors (sharded when shard_size is given); returns it.
    `scale` multiplies every weight; with `delta_of`, the weights are that model's plus scale x noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(delta_of.get_parameter(name).float() + scale * p if delta_of is not None else scale * p)
    model = model.to(dtype).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    if tokenizer:
        char_tokenizer(folder)
    return model


def write_demo(folder: Path) -> None:
    """The inputs of configs/cocktail-tiny.yaml."""
    base = tiny_llama(folder / "base", seed=0)
    tiny_llama(folder / "math", seed=1, scale=0.02, delta_of=base, shard_size="40KB")
    tiny_llama(folder / "code", seed=2, scale=0.05, delta_of=base, shard_size="40KB")
    (folder / "examples.jsonl").write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in EXAMPLES))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0] if argv else "runs/cocktail-demo")
    write_demo(target)
    print(f"wrote base, math, code and examples.jsonl to {target}")


if __name__ == "__main__":
    main()
