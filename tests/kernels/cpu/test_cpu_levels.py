"""Instruction-set levels: the cap by set_isa and by DITQ_CPU_ISA, and unknown names."""

from __future__ import annotations

import pytest

from ditq.kernels import ops
from ditq.kernels.cpu import extension, levels, rules


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ops.KernelError, match="unknown instruction set"):
        levels.set_isa("avx1024")


def test_the_environment_caps_the_instruction_set(built, monkeypatch):
    monkeypatch.setenv(levels.ENV_ISA, "avx2")
    assert extension.isa() == min(built, levels.AVX2)
    if built >= levels.AVX2:
        assert rules.available_backends()["w8a8_linear"] == "cpp-avx2"
        assert ops.implementation("w4a8_linear", "cpu") == "cpp-avx2"
    levels.set_isa("scalar")  # set_isa wins over the environment
    try:
        assert extension.isa() == levels.SCALAR
    finally:
        levels.set_isa(None)
    monkeypatch.setenv(levels.ENV_ISA, "avx9")
    with pytest.raises(ops.KernelError, match="DITQ_CPU_ISA='avx9' is not an instruction set; use one of"):
        extension.isa()
