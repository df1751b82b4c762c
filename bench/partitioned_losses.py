"""Cocktail losses with each candidate partitioned over N Ray workers, against one process. Prints JSON.

N is weights_from_examples.workers.

Per candidate (a decoder and an embedding model, fp32): the loss from N ZeRO-3 workers and from one
process (target: within 1e-5), and the parameter bytes each worker held, as a share of the model
(target: 1/N within 5 %).

    .venv/bin/python bench/partitioned_losses.py [--workers 2] [--width 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from calm_dist.testing.tiny_checkpoints import char_tokenizer
    from launcher.runtime.ray_start import start_ray, stop_ray
    from merge.cocktail.examples import read_examples
    from merge.cocktail.losses import model_loss
    from merge.execution.partitioned_losses import partitioned_losses
    from merge.merge_config import ExamplesWeights

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Each kind reads its own format: decoder {input, output}, embedding {query, pos, neg}.
        examples_files = {"decoder": root / "decoder-examples.jsonl", "embedding": root / "embedding-examples.jsonl"}
        examples_files["decoder"].write_text("".join(
            json.dumps({"input": f"{i} plus {i} is", "output": f" {2 * i}, and {i} times {i} is {i * i}."}) + "\n"
            for i in range(8)))
        examples_files["embedding"].write_text("".join(
            json.dumps({"query": f"what is {i} plus {i}", "pos": [f"{i} plus {i} is {2 * i}"],
                        "neg": [f"{i} times {j} is {i * j}" for j in range(2, 6)]}) + "\n"
            for i in range(8)))
        torch.manual_seed(0)
        width, layers = args.width, args.layers
        LlamaForCausalLM(LlamaConfig(vocab_size=98, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                     num_attention_heads=width // 64, num_key_value_heads=width // 128,
                                     max_position_embeddings=128)).save_pretrained(root / "decoder")
        BertModel(BertConfig(vocab_size=98, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                             intermediate_size=2 * width, max_position_embeddings=128)).save_pretrained(root / "embedding")
        for name in ("decoder", "embedding"):
            char_tokenizer(root / name)

        started = start_ray(None, num_cpus=args.workers)
        results = []
        try:
            for kind in ("decoder", "embedding"):
                spec = ExamplesWeights(examples=examples_files[kind], kind=kind, workers=args.workers, negatives=3)
                examples = read_examples(spec.examples, kind, spec.negatives)
                held: list[dict] = []
                (loss,) = partitioned_losses([(root / kind, root / kind)], examples, spec, lambda _: None, held)
                single = model_loss(root / kind, root / kind, examples, spec)
                shares = [b / held[0]["total_bytes"] for b in held[0]["held_bytes"]]
                results.append({
                    "kind": kind, "parameters_bytes": held[0]["total_bytes"], "workers": args.workers,
                    "held_bytes_per_worker": held[0]["held_bytes"], "share_per_worker": [round(s, 5) for s in shares],
                    "share_target_met": all(abs(s * args.workers - 1) <= 0.05 for s in shares),
                    "loss_partitioned": loss, "loss_single_process": single, "abs_difference": abs(loss - single),
                    "loss_target_met": abs(loss - single) <= 1e-5,
                })
        finally:
            if started:
                stop_ray()
    print(json.dumps({"load_average": os.getloadavg()[0], "candidates": results}, indent=1))


if __name__ == "__main__":
    main()
