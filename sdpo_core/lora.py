"""LoRA for a train step (``train.lora``), through peft.

At step t the policy is M(t-1) with a fresh adapter on the configured linear layers; only the
adapter trains. The reference log-probs were computed from M(t-1) beforehand, so no second model
is held in memory. After the step the adapter is merged, W' = W + (alpha / r) B A, and the full
model is saved and registered: the next step's reference and start.
"""

from __future__ import annotations

from typing import Any

from sdpo_core.config import LoraConfig


def with_adapter(model: Any, cfg: LoraConfig) -> Any:
    """``model`` with a fresh LoRA adapter (B = 0, so it computes what ``model`` did); only the
    adapter's parameters require gradients. ``cfg.r == 0`` returns ``model`` as it is."""
    if cfg.r == 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:  # no module of the model matches target_modules
        from sdpo_core.train import TrainingError

        raise TrainingError(f"train.lora.target_modules {list(cfg.target_modules)}: {exc}") from None


def merged(model: Any) -> Any:
    """The plain model with its adapter merged into the weights (a model without one as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
