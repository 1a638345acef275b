"""Data tests run single-threaded: their tensors are tiny, and on a busy 2-core machine
torch's intra-op threads wait on each other far longer than the work takes."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
