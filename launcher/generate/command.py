"""`calm generate COMPOSITION --prompt TEXT | --prompts FILE`: completions from a saved composition on its
base models, in this process (no Ray): greedy by default, or sampled; a single prompt streams its
tokens to the terminal as they are decoded."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calm_dist.errors import CompositionError
from launcher.base_model_flags import add_base_model_arguments
from launcher.train_config import ConfigError

USER_ERRORS = (ConfigError, CompositionError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("composition", help="a composition folder (composition.json + composition.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; its completion streams to the terminal")
    source.add_argument("--prompts", help="a file of prompts: .txt (one per line), or JSONL/CSV/Parquet records")
    parser.add_argument("--prompt-field", default="prompt", help="the records' prompt field (default: prompt)")
    add_base_model_arguments(parser, from_config=False)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="base models' dtype (default: as each checkpoint is stored)")
    parser.add_argument("--device", default="auto",
                        help="'auto' (default): the models spread over every GPU, then CPU memory, the way "
                        "transformers' device_map='auto' does; or one torch device (cpu, cuda, cuda:1)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--top-k", type=int, default=0, help="with --sample: keep the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus probability mass")
    parser.add_argument("--seed", type=int, default=0, help="with --sample: the sampling seed")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (--prompts)")
    parser.add_argument("--output", help="also write {prompt, completion} records here as JSON Lines")
    parser.add_argument("--verbose", action="store_true", help="show transformers' loading messages and progress bars")


def base_paths(composition: Path, anchor: str | None, augmenting: list[str] | None) -> tuple[str, list[str]]:
    """The base models' folders: the overrides given, else the paths composition.json names."""
    from calm_dist.model.composition_checkpoint import MANIFEST, read_manifest

    manifest = read_manifest(composition)
    count = len(manifest["augmenting"])
    if augmenting and len(augmenting) != count:
        raise ConfigError(f"--augmenting: {composition / MANIFEST} composes {count} augmenting model(s), "
                          f"{len(augmenting)} paths given")
    paths = [anchor or manifest["anchor"].get("source", ""),
             *(augmenting or [a.get("source", "") for a in manifest["augmenting"]])]
    for k, path in enumerate(paths):
        role, flag = ("anchor", "--anchor") if k == 0 else (f"augmenting model {k - 1}", "--augmenting")
        if not path:
            raise ConfigError(f"{composition / MANIFEST}: names no path for the {role}; pass {flag} PATH")
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{flag if (anchor if k == 0 else augmenting) else composition / MANIFEST}: "
                              f"the {role} {path} is not a Hugging Face model folder (no config.json)")
    return paths[0], paths[1:]


def read_prompts(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"--prompts: {path}: no such file")
    if path.suffix == ".txt":
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        from calm_dist.data.records import DataError, load_records

        try:
            records = load_records(path)
        except DataError as err:
            raise ConfigError(f"--prompts: {err}") from None
        if field not in records.column_names:
            raise ConfigError(f"--prompts: {path}: no field {field!r} (its fields are {records.column_names}); "
                              "pass --prompt-field")
        prompts = [str(p) for p in records[field]]
    if not prompts:
        raise ConfigError(f"--prompts: {path}: no prompts")
    return prompts


def load(composition: Path, anchor: str | None = None, augmenting: list[str] | None = None,
         tokenizer: str | None = None, dtype: str = "auto", device: str = "auto",
         augmenting_tokenizers: list[str] | None = None):
    """(composed model, anchor tokenizer) from a composition folder and its base models. A composition
    trained across tokenizers gets its augmenting models' own tokenizers: augmenting_tokenizers, else
    each model's folder (checked against the identities composition.json recorded). device "auto": the
    models are spread over the GPUs and CPU memory (accelerate), each connection placed with its anchor
    layer; else everything on that one device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calm_dist.model.composition_checkpoint import load_composition, read_manifest

    anchor_path, augmenting_paths = base_paths(composition, anchor, augmenting)
    if augmenting_tokenizers and len(augmenting_tokenizers) != len(augmenting_paths):
        raise ConfigError(f"--augmenting-tokenizer: {len(augmenting_paths)} augmenting model(s), "
                          f"{len(augmenting_tokenizers)} tokenizers given")

    def model(path):
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        if device == "auto":
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map="auto").eval()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()

    anchor_tokenizer = AutoTokenizer.from_pretrained(tokenizer or anchor_path)
    recorded = (read_manifest(composition).get("tokenizers") or {}).get("augmenting") or []
    tokenizers = None
    if augmenting_tokenizers or any(r is not None for r in recorded):
        own = augmenting_tokenizers or [path if r is not None else None for path, r in zip(augmenting_paths, recorded, strict=True)]
        tokenizers = [anchor_tokenizer, *(AutoTokenizer.from_pretrained(p) if p else None for p in own)]
    composed = load_composition(composition, model(anchor_path), [model(p) for p in augmenting_paths], tokenizers)
    return composed.eval(), anchor_tokenizer


def _streamer(tokenizer, stream):
    """on_token for decoding one prompt: writes the text of each new token as it comes, until EOS."""
    tokens: list[int] = []
    shown = ""
    ended = False

    def on_token(token) -> None:
        nonlocal shown, ended
        ended = ended or token[0].item() == tokenizer.eos_token_id
        if ended:
            return
        tokens.append(int(token[0]))
        text = tokenizer.decode(tokens)  # the whole text so far: tokens may join into one character
        stream.write(text[len(shown):])
        stream.flush()
        shown = text

    return on_token


def run(args: argparse.Namespace) -> int:
    composition = Path(args.composition)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.sample and args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature}: must be > 0 when sampling (drop --sample for greedy)")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ConfigError("--top-p must be in (0, 1] and --top-k >= 0")
    if not args.verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    prompts = [args.prompt] if args.prompt is not None else read_prompts(Path(args.prompts), args.prompt_field)
    model, tokenizer = load(composition, args.anchor, args.augmenting, args.tokenizer, args.dtype, args.device,
                            args.augmenting_tokenizer)
    from calm_dist.model.decoding import complete

    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    if args.prompt is not None:
        print(args.prompt, end="", flush=True)
        completions = complete(model, tokenizer, prompts, on_token=_streamer(tokenizer, sys.stdout), **settings)
        print()
    else:
        completions = complete(model, tokenizer, prompts, **settings)
        for prompt, completion in zip(prompts, completions, strict=True):
            print(f"{prompt!r} -> {completion!r}")
    if args.output:
        lines = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, completions, strict=True))
        Path(args.output).write_text(lines)
        print(f"completions: {args.output}")
    return 0
