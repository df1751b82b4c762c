"""GPU smoke check: what a `calm train` worker runs, on one device, end to end, in one command.

    python bench/gpu_smoke.py --device cuda           # on a GPU machine (README: Benchmarks)
    python bench/gpu_smoke.py --device cpu --steps 2  # the same code on CPU (tests/test_gpu_smoke.py)

It starts itself again under torchrun with one process (no Ray). That worker trains a composition through
calm_dist.distributed.trainer.Trainer, the code of every `calm train` worker: a SmolLM2-135M anchor in
bf16, partitioned by DeepSpeed ZeRO-3 over a 1-rank group (NCCL on cuda, gloo on cpu), a small seeded
augmenting model of its vocabulary beside it, two-digit additions as prompt/completion data. The last
step runs the cached greedy eval; the composition is exported and `calm generate` completes one prompt.
One JSON line comes out on stdout (everything else goes to stderr): median step time and tokens/s
(the first step left out), peak GPU memory, eval exact match and loss, the generated text.

The anchor: --anchor PATH, else the SmolLM2 asset when this machine has it (`python -m
calm_dist.testing.real_checkpoint` prepares it), else a model of SmolLM2's shape with seeded weights and
a character tokenizer of its vocabulary (a machine with no registry), made once under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages without an install

# SmolLM2-135M-Instruct's config.json, what the seeded stand-in is built from
SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)


def anchor_folder(given: str | None, assets: Path) -> tuple[Path, str]:
    """(the anchor's folder, what it is)."""
    from calm_dist.testing import real_checkpoint

    if given:
        return Path(given).resolve(), given
    if (real_checkpoint.cache_root() / f"smollm2-135m-instruct-{real_checkpoint.VERSION}" / real_checkpoint.STAMP).is_file():
        return real_checkpoint.smollm2(), "smollm2-135m-instruct"
    folder = assets / "smollm2-shaped-seeded"
    if not (folder / "done").is_file():
        seeded_smollm2(folder)
    return folder, "smollm2-135m-shaped, seeded weights"


def seeded_smollm2(folder: Path) -> None:
    """A Llama of SmolLM2-135M's shape with seeded random weights (bf16), and a character tokenizer with
    its 49,152 ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from calm_dist.testing.tokenizers import tiny_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer(SMOLLM2_SHAPE["vocab_size"]).save_pretrained(folder)
    (folder / "done").write_text("")


def prepare(args: argparse.Namespace) -> tuple[Path, str]:
    """The run's training config (its path), its models and data written under --out; and the anchor's name."""
    import yaml

    from calm_dist.testing.tiny_models import tiny_model
    from launcher.demo.command import toy_records

    out = Path(args.out).resolve()
    anchor, name = anchor_folder(args.anchor, out / "assets")
    augmenting = out / "assets" / "augmenting"
    if not (augmenting / "config.json").is_file():
        import torch

        vocab = json.loads((anchor / "config.json").read_text())["vocab_size"]
        tiny_model("llama", layers=4, width=128, heads=4, vocab=vocab, seed=1, dtype=torch.bfloat16,
                   tied=True).save_pretrained(augmenting)
    for split, count, seed in (("train", 512, 0), ("eval", 64, 1000)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_records(count, seed)))
    config = {
        "name": "gpu-smoke",
        "models": {"anchor": {"path": str(anchor), "dtype": "bfloat16"},
                   "augmenting": [{"path": str(augmenting), "dtype": "bfloat16"}]},
        "composition": {"every_n": 2},
        "data": {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl"), "prompt_field": "prompt",
                 "completion_field": "completion", "max_length": 32},
        "training": {"steps": args.steps, "micro_batch_size": args.batch, "global_batch_size": args.batch,
                     "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant"}, "log_every": 1,
                     "eval_every": args.steps, "eval_samples": args.eval_samples, "eval_max_new_tokens": 4},
        "deepspeed": {"zero_stage": 3},
        "ray": {"num_workers": 1, "use_gpu": args.device == "cuda"},
        "output_dir": str(out / "runs"),
    }
    path = out / "gpu-smoke.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, name


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: train, evaluate, export, generate; rank 0 writes the result beside the config."""
    from launcher.runtime.worker_setup import start_worker
    from launcher.train_config import load_config

    config = load_config(args.worker)
    device = start_worker(config.ray.use_gpu)  # before DeepSpeed is imported: its accelerator
    import torch
    import torch.distributed as dist

    from calm_dist.distributed.trainer import Trainer

    rank = int(os.environ["RANK"])
    start = time.perf_counter()
    trainer = Trainer(config, device, rank)  # joins torchrun's group: NCCL when ray.use_gpu, else gloo
    logs: dict[int, dict] = {}
    trainer.fit(report=lambda step, folder: None, on_log=lambda step, metrics: logs.update({step: dict(metrics)}))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    composition = trainer.export(config.run_dir / "composition")
    dist.destroy_process_group()
    if rank != 0:
        return
    prompt = json.loads(Path(config.data.eval).read_text().splitlines()[0])["prompt"]
    generated = calm_generate(composition, prompt, str(device), Path(args.worker).with_name("generated.jsonl"))
    timed = [logs[step] for step in sorted(logs) if step > 1] or list(logs.values())
    last = logs[config.training.steps]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "anchor": args.anchor_name,
        "steps": max(logs),
        "step_time_s": statistics.median(m["step_time_s"] for m in timed),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
        "peak_gpu_memory_bytes": peak,
        "train_loss": last["loss"],
        "eval_exact_match": last.get("eval_exact_match"),
        "eval_loss": last.get("eval_loss"),
        "prompt": prompt,
        "generated": generated,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    Path(args.worker).with_name("result.json").write_text(json.dumps(result) + "\n")


def calm_generate(composition: Path, prompt: str, device: str, output: Path) -> str:
    """`calm generate COMPOSITION --prompt PROMPT` on this device, in this process; the completion."""
    from launcher.cli import main

    try:
        main(["generate", str(composition), "--prompt", prompt, "--device", device, "--dtype", "bfloat16",
              "--max-new-tokens", "8", "--output", str(output)])
    except SystemExit as exit_:
        if exit_.code:
            raise RuntimeError(f"calm generate exited {exit_.code}") from None
    return json.loads(output.read_text())["completion"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--anchor", help="the anchor's Hugging Face folder (default: SmolLM2-135M, see above)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu-smoke"), help="models, data, run, result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the config: this process is torchrun's worker
    parser.add_argument("--anchor-name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.device == "cpu":  # else DeepSpeed, imported by transformers here, guesses it aloud on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_smoke: no CUDA device here (torch.cuda.is_available() is False); try --device cpu")
    config, name = prepare(args)
    result = config.with_name("result.json")
    result.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # The worker's output (DeepSpeed's, the generated text streaming) goes to stderr: stdout holds the JSON.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           __file__, "--worker", str(config), "--anchor-name", name], env=env, cwd=ROOT,
                          stdout=sys.stderr)
    if done.returncode or not result.is_file():
        sys.exit(f"gpu_smoke: the torchrun worker failed (exit {done.returncode}); its output is above")
    print(result.read_text().strip())


if __name__ == "__main__":
    main()
