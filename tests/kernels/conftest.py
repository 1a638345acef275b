"""Fixtures of the Triton kernel tests (test_triton*.py): the host functions, and the same with
poisoned outputs. (tests/kernels/cpu/conftest.py has the CPU backend's own ``poisoned``.)"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def launch():
    from ditq.kernels.triton import launch

    return launch


@pytest.fixture
def poisoned(launch, monkeypatch):
    """Kernel outputs start as values no kernel writes: NaN (floats), -128 (codes stay in [-127, 127])."""

    def alloc(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -128
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(launch, "_alloc", alloc)
    return launch
