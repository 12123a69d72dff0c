from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the tiny model's tests: it gains nothing from more, and on a shared
    2-core machine extra threads oversubscribe the cores (seen: 15x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def no_checkpointing(config_class: type) -> dict[str, bool]:
    """The keyword that turns activation checkpointing off in a transformers TrainingArguments
    subclass (TRL's DPOConfig): transformers 5.24 calls it activation_checkpointing, 5.17 (the GPU
    machine's) gradient_checkpointing."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}
