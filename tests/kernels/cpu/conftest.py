"""Fixtures of the CPU backend's tests: the built library, each instruction-set level this CPU has,
poisoned output buffers, a fresh build state. The C++ kernels are built once per session (seconds;
cached on disk by torch across sessions)."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels.cpu import extension, levels, rules
from ditq.kernels.cpu import ops as cpu_ops


@pytest.fixture
def built():
    """The library's best level, built now (at once where it is already; tests with ``fresh_state``
    forget the build, which the next test that needs it reloads from torch's cache)."""
    if not extension.build():
        pytest.skip(f"the C++ CPU kernels could not be built here: {rules.available_backends()['extension']}")
    return extension.state.best_isa


def _paths(best: int) -> list[str]:
    return [name for name in levels.ISAS if levels.ISAS.index(name) <= best]


@pytest.fixture(params=["avx512_vnni", "avx_vnni", "avx2", "scalar"])
def isa(request, built):
    """Each instruction-set level the CPU has (scalar = the torch._int_mm / reference routes)."""
    if request.param not in _paths(built):
        pytest.skip(f"this CPU has no {request.param}")
    levels.set_isa(request.param)
    yield request.param
    levels.set_isa(None)


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel output buffers filled with values no kernel writes: NaN (floats), -128 (int8 codes)."""

    def alloc(shape, dtype):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype)
        return torch.full(shape, -128, dtype=dtype)

    monkeypatch.setattr(cpu_ops, "_alloc", alloc)


@pytest.fixture
def fresh_state():
    """Run with a fresh build state; afterwards forget it again (the cached library reloads fast)."""
    extension._reset_for_tests()
    yield
    extension._reset_for_tests()
