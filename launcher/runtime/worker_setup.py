"""What every Ray Train worker of ours sets up, for training (launcher/train/worker.py) and evaluation
(launcher/eval/worker.py) alike: its output, its device, the base models (the anchor straight into its
ZeRO-3 partition, augmenting models whole beside it), the tokenizer, and the ZeRO-3 engine."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from launcher.runtime.quiet import redirect_worker_output
from launcher.train_config import ModelSpec


def start_worker(use_gpu: bool) -> torch.device:
    """First thing in a worker: its output to the run's log (when quiet), DeepSpeed's accelerator, the
    device."""
    redirect_worker_output()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def model_config(spec: ModelSpec):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)


def load_whole(specs: Sequence[ModelSpec], device: torch.device) -> list[torch.nn.Module]:
    """Frozen models held whole on this rank (the augmenting models beside a partitioned anchor)."""
    from transformers import AutoModelForCausalLM

    return [
        AutoModelForCausalLM.from_pretrained(s.path, dtype=getattr(torch, s.dtype), trust_remote_code=s.trust_remote_code)
        .to(device).requires_grad_(False).eval()
        for s in specs
    ]


def load_partitioned_model(spec: ModelSpec, ds_config: dict) -> torch.nn.Module:
    """A frozen model loaded straight into this rank's ZeRO-3 partition: no rank holds it whole."""
    from calm_dist.distributed.partitioned_loading import load_partitioned

    return load_partitioned(spec.path, ds_config, getattr(torch, spec.dtype), trust_remote_code=spec.trust_remote_code)


def load_tokenizer(path: str):
    """(tokenizer, pad id): the pad token, or EOS for tokenizers without one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad


def own_tokenizers(tokenizer, paths: list[str | None]):
    """(aligner, augmenting pad ids) for augmenting models reading the text through the tokenizers at
    `paths` (None: the model reads the anchor's tokens), or (None, []) when none has its own."""
    from calm_dist.model.alignment import Aligner

    own = [load_tokenizer(path)[0] if path else None for path in paths]
    if all(t is None for t in own):
        return None, []
    aligner = Aligner(tokenizer, own)
    return aligner, [aligner.pad_id(k) if t is not None else 0 for k, t in enumerate(own)]


def training_evaluation(config, engine, tokenizer, records, tokenized, states_for, decode_states, new_cache,
                        device: torch.device, pad: int, data_rank: int, data_world: int,
                        augmenting_pad_ids: list[int] | None = None):
    """The evaluate() callback of the training loop: eval loss, and exact match of greedy completions
    (KV-cached, or recomputed across tokenizers) for prompt/completion data, over the first
    training.eval_samples records. Each anchor rank evaluates an equal share (ZeRO-3 needs lockstep)."""
    from calm_dist.distributed.lockstep_eval import eval_share, evaluate

    train, data = config.training, config.data
    records = records.select(range(min(len(records), train.eval_samples)))
    tokenized = tokenized.select(range(min(len(tokenized), train.eval_samples)))
    share = eval_share(records, tokenized, tokenizer, micro_batch_size=train.micro_batch_size, rank=data_rank,
                       world_size=data_world, pad_token_id=pad, prompt_field=data.prompt_field,
                       completion_field=data.completion_field, augmenting_pad_ids=augmenting_pad_ids or [])

    def run_evaluation() -> dict:
        metrics = evaluate(engine, share, decode=tokenizer.decode, states_for=states_for,
                           decode_states=decode_states, new_cache=new_cache,
                           max_new_tokens=train.eval_max_new_tokens, pad_token_id=pad,
                           eos_token_id=tokenizer.eos_token_id, device=device)
        metrics.pop("eval_samples", None)
        return metrics

    return run_evaluation
