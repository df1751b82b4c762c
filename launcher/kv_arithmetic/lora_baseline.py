"""The paper's LoRA ablation: adapters on the anchor with as many trainable parameters as the
composition, trained on the same examples, to show the gain comes from the augmenting model."""

from __future__ import annotations

import sys
import time
from collections.abc import Collection

import torch
from torch import nn

# Every linear map of a decoder layer, in the names Llama-like families use.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _targets(model: nn.Module, target_modules: tuple[str, ...], layers: Collection[int] | None = None,
             ) -> dict[str, nn.Linear]:
    """{full name: module} of the linear maps to adapt: those named in target_modules, in the decoder
    layers whose indices are in `layers` (every layer when None)."""
    from calm_dist.model.architectures import decoder_layers

    names = {id(m): name for name, m in model.named_modules()}
    blocks = [block for i, block in enumerate(decoder_layers(model)) if layers is None or i in layers]
    found = {names[id(m)]: m for block in blocks for name, m in block.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules}
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear layer named any of {target_modules}"
                         + ("" if layers is None else f" in decoder layers {sorted(layers)}"))
    return found


def parameters_per_rank(model: nn.Module, target_modules: tuple[str, ...] = TARGET_MODULES,
                        layers: Collection[int] | None = None) -> int:
    """LoRA adds r * (in + out) parameters to each adapted linear layer."""
    return sum(m.in_features + m.out_features for m in _targets(model, target_modules, layers).values())


def matched_rank(model: nn.Module, parameters: int, target_modules: tuple[str, ...] = TARGET_MODULES,
                 layers: Collection[int] | None = None) -> int:
    """The rank whose adapter parameter count is nearest to `parameters` (at least 1)."""
    return max(1, round(parameters / parameters_per_rank(model, target_modules, layers)))


def with_lora(model: nn.Module, rank: int, target_modules: tuple[str, ...] = TARGET_MODULES,
              layers: Collection[int] | None = None) -> nn.Module:
    """The model wrapped by PEFT with LoRA adapters (alpha = rank, no dropout) on target_modules in the
    given decoder layers (all when None); only adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(_targets(model, target_modules, layers)))
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keep_anchor_lm_loss(model: nn.Module, layers: Collection[int] | None = None, anchor_weight: float = 1.0):
    """A PEFT model's training loss on a collated batch: next-token cross-entropy, and in rows marked
    keep_anchor the KL divergence from the base model alone (adapters off), weighed by anchor_weight, as
    the composition is trained (calm_dist.model.objectives). `layers`: the adapted decoder layers (all when
    None); the base model alone runs again only from the lowest of them up (calm_dist.model.anchor_alone)."""
    from calm_dist.model.anchor_alone import AnchorAlone
    from calm_dist.model.objectives import keep_anchor_loss

    alone = AnchorAlone(model.get_base_model(), min(layers, default=0) - 1 if layers is not None else -1)

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = batch.get("keep_anchor")
        if keep is None or not keep.any():  # the model's own loss, as before keep_anchor existed
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with alone.capturing(keep):
            logits = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            anchor_logits = alone.logits(ids[keep], mask[keep])
        return keep_anchor_loss(logits, batch["labels"], keep, anchor_logits, anchor_weight)

    return loss


def train_lora(anchor: nn.Module, rows: list[dict], training, parameters: int, seed: int, pad_token_id: int,
               layers: Collection[int] | None = None) -> tuple[nn.Module, int, int, float]:
    """LoRA on `anchor` (in the given decoder layers, else all), its rank matched to `parameters`,
    trained on tokenized `rows` as the composition was (rows with keep_anchor keep the base model's
    predictions; `training`: a TrainConfig's training section;
    same steps, global batch, learning rate, warm-up and weight decay) in one process. Returns the model
    in eval mode, its rank, its trainable parameter count and the seconds it took."""
    from tqdm import tqdm

    from launcher.kv_arithmetic import pretraining as local_training

    rank = matched_rank(anchor, parameters, layers=layers)
    torch.manual_seed(seed)
    model = with_lora(anchor, rank, layers=layers)
    start = time.perf_counter()
    with tqdm(total=training.steps, desc="LoRA baseline", unit="step", leave=False, dynamic_ncols=True, disable=None,
              file=sys.stdout) as bar:  # stdout: quiet mode sends stderr to the log
        model.train()
        local_training.train(keep_anchor_lm_loss(model, layers, training.keep_anchor_weight), model.parameters(),
                             local_training.batches(rows, training.global_batch_size, seed, pad_token_id),
                             training.steps, lr=training.optimizer.lr, warmup_steps=training.schedule.warmup_steps,
                             weight_decay=training.optimizer.weight_decay, on_step=lambda step, loss: bar.update(1))
    return model.eval(), rank, trainable_parameters(model), time.perf_counter() - start
