"""The paper's LoRA ablation: adapters on the anchor with as many trainable parameters as the
composition, trained on the same examples, to show the gain comes from the augmenting model."""

from __future__ import annotations

from torch import nn

# Every linear map of a decoder layer, in the names Llama-like families use.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _targets(model: nn.Module, target_modules: tuple[str, ...]) -> list[nn.Linear]:
    found = [m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear layer named any of {target_modules}")
    return found


def parameters_per_rank(model: nn.Module, target_modules: tuple[str, ...] = TARGET_MODULES) -> int:
    """LoRA adds r * (in + out) parameters to each adapted linear layer."""
    return sum(m.in_features + m.out_features for m in _targets(model, target_modules))


def matched_rank(model: nn.Module, parameters: int, target_modules: tuple[str, ...] = TARGET_MODULES) -> int:
    """The rank whose adapter parameter count is nearest to `parameters` (at least 1)."""
    return max(1, round(parameters / parameters_per_rank(model, target_modules)))


def with_lora(model: nn.Module, rank: int, target_modules: tuple[str, ...] = TARGET_MODULES) -> nn.Module:
    """The model wrapped by PEFT with LoRA adapters (alpha = rank, no dropout); only adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
