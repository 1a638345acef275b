"""Instruction-set levels of the C++ CPU kernels: their numbering, what this CPU has, and the cap.

:data:`ISAS` numbers the levels as the library does. The CPU's flags are read once,
without building anything (:func:`isa_from_flags`); the built library reports the
best level it can run itself (:func:`ditq.kernels.cpu.extension.isa`). :func:`set_isa`
or ``DITQ_CPU_ISA=avx2`` caps the level, so that a lesser CPU's paths run, and are
tested, on any x86 machine with AVX-512 VNNI.
"""

from __future__ import annotations

import functools
import os

import torch

from ditq.kernels.checks import KernelError

ENV_ISA = "DITQ_CPU_ISA"  # cap the instruction set (avx_vnni, avx2, scalar): a lesser CPU's paths
ISAS = ("scalar", "avx2", "avx_vnni", "avx512_vnni")
"""Instruction sets of the C++ kernels, in the numbering the library uses (0..3). ``avx_vnni`` is AVX2
with 256-bit ``vpdpbusd`` (AVX-VNNI, or AVX-512 VNNI's EVEX form when capped there): only the
integer GEMMs differ from ``avx2``."""
SCALAR, AVX2, AVX_VNNI, AVX512_VNNI = range(4)

_forced: int | None = None  # the cap set_isa chose (None: DITQ_CPU_ISA's, if set)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none), read once: the rule
    table asks on every forward of a layer without ditq's kernels, and a read is slow
    (``docs/benchmarks.md``, "Numbers formerly in kernel docstrings")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def int_mm_is_fast() -> bool:
    """Whether ``torch._int_mm`` (oneDNN) beats fp32 ``F.linear`` here: only with int8 dot-product
    instructions (AVX-512 VNNI, AMX). Without them it runs many times slower than fp32 and must
    never run (measured on AVX-512 VNNI and AVX2-only CPUs: ``docs/benchmarks.md``, "Numbers
    formerly in kernel docstrings")."""
    return hasattr(torch, "_int_mm") and bool({"avx512_vnni", "amx_int8"} & _cpu_flags())


def isa_from_flags() -> int:
    """The best level this CPU's flags allow (what the library will report once built)."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        return AVX512_VNNI
    if not {"avx2", "fma"} <= flags:
        return SCALAR
    return AVX_VNNI if "avx_vnni" in flags else AVX2


def _env_isa() -> int | None:
    name = os.environ.get(ENV_ISA, "").strip().lower()
    if not name:
        return None
    if name not in ISAS:
        raise KernelError(f"{ENV_ISA}={name!r} is not an instruction set; use one of {', '.join(ISAS)}")
    return ISAS.index(name)


def capped(level: int) -> int:
    """``level`` capped by :func:`set_isa`, or else by ``DITQ_CPU_ISA``."""
    cap = _forced if _forced is not None else _env_isa()
    return level if cap is None else min(level, cap)


def set_isa(name: str | None) -> None:
    """Use at most instruction set ``name`` ("avx2", "scalar", ...) instead of the best; None: the best
    (or ``DITQ_CPU_ISA``'s cap where set).

    For tests and benchmarks (the fallback paths run on any machine this way).
    """
    if name is not None and name not in ISAS:
        raise KernelError(f"unknown instruction set {name!r}; use one of {', '.join(ISAS)} or None")
    global _forced
    _forced = None if name is None else ISAS.index(name)
