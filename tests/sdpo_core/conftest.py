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
