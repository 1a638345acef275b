"""The rule table: what each op runs on CPU at each instruction set, and on this machine now.

One table per op and instruction set (:func:`rule_table`; for this machine
:func:`available_backends`, or :func:`planned_backends` before the build), measured so
that ``auto`` never runs a path slower than fp32 ``F.linear`` (numbers, machines and
commands: ``docs/benchmarks.md``, "Integer speed on every x86 CPU"):

* ``w8a8_linear``, ``w158a8_linear``, ``w4a8_linear``: ditq's C++ GEMMs at every token
  count on AVX-512 VNNI, AVX-VNNI and AVX2, on weights prepacked once
  (:mod:`ditq.kernels.cpu.prepack`), with products that cannot saturate: results equal
  the references bit for bit (how: ``csrc/gemm_int8.cpp``, ``csrc/gemm_w4a8.cpp``).
  W4A8 needs both scales constant over segments of a multiple of 8 inputs
  (``gcd(ga, gw) % 8 == 0``); other layouts take the reference, and their layers keep
  the float path (``ops.implementation``).
* Without AVX2 (or without a compiler), ``w8a8_linear`` runs ``torch._int_mm`` (oneDNN)
  only where the CPU has int8 dot products (:func:`~ditq.kernels.cpu.levels.int_mm_is_fast`);
  elsewhere, and for the other integer ops, the reference is what an op call runs and
  quantized layers keep their float path.
* ``quantize_per_token_int8``, ``quantize_per_token_asym`` and the producers fused with
  int8 quantization (float32 inputs; others take the reference): one pass per row, the
  float activation never goes to memory (``csrc/quantize.cpp``, ``csrc/producers.cpp``).
  AVX-512 and AVX2 paths. Codes equal the reference's but for rare off-by-ones at
  rounding boundaries (producers only).
* ``ternary_linear``, ``int4_linear`` (weight-only, float32 activations), on AVX2 and
  AVX-512: few tokens decoded in registers, more through a per-thread buffer of
  dequantized rows, many through blocks dequantized for BLAS (the thresholds are in
  :mod:`ditq.kernels.cpu.ops`). Only the summation order differs from the reference
  (relative error ~4e-7). ``w158a8_linear`` is faster than these at every M: the integer
  path is the fast one, weight-only the accurate one.

A table rather than a per-machine calibration: the choice never flips with the shape
on the CPUs measured, and a table gives the same answer on every run, in tests, and
before anything is built.
"""

from __future__ import annotations

from ditq.kernels.cpu import extension
from ditq.kernels.cpu import ops as cpu_ops
from ditq.kernels.cpu.levels import AVX2, AVX_VNNI, ISAS, capped, int_mm_is_fast, isa_from_flags


def rule_table(level: int | None) -> dict[str, str]:
    """What each op runs with ditq's kernels at instruction set ``level`` (None: not built).

    Measured per op and level on AVX-512 VNNI (Cascade Lake Xeon, Zen 4 EPYC) and AVX2 CPUs
    (an AVX2-only EPYC, and Zen 4 capped at AVX2), one thread, DiT-XL/2 and TerDiT-4.2B shapes,
    M = 1..4096 (``docs/benchmarks.md``): the integer GEMMs beat fp32 ``F.linear`` at every M on
    both SIMD levels, so they run at every M there; torch._int_mm only where it is fast
    (:func:`~ditq.kernels.cpu.levels.int_mm_is_fast`); elsewhere the reference, whose layers
    keep their float path.
    """
    cpp = f"cpp-{ISAS[level]}" if level is not None else None
    simd = cpp if level is not None and level >= AVX2 else None
    # everything but the integer GEMMs runs its AVX2 code on the avx_vnni level
    vec = f"cpp-{ISAS[AVX2 if level == AVX_VNNI else level]}" if level is not None else None
    wo = "reference"
    if simd:
        wo = f"{vec} (M <= {cpu_ops.WEIGHT_ONLY_DIRECT_MAX_M}) / {vec} dequant + BLAS"
        if cpu_ops.WEIGHT_ONLY_FUSED_MAX_M > 0:
            wo += f"; M <= {min(cpu_ops.WEIGHT_ONLY_FUSED_MAX_M, 4)} decoded in registers"
    return {
        "quantize_per_token_int8": vec or "reference",
        "quantize_per_token_asym": vec or "reference",
        "layernorm_modulate_quantize_int8": vec or "reference",  # float32 inputs
        "gelu_quantize_int8": vec or "reference",
        "rmsnorm_modulate_quantize_int8": vec or "reference",
        "swiglu_quantize_int8": vec or "reference",
        "w8a8_linear": simd or ("torch._int_mm" if int_mm_is_fast() else "reference"),
        "w158a8_linear": simd or "reference",
        "w4a8_linear": simd or "reference",  # segments of gcd(ga, gw) % 8 != 0: the reference
        "ternary_linear": wo,
        "int4_linear": wo,
    }


def available_backends(build_now: bool = False) -> dict[str, str]:
    """What each op runs on CPU now, plus ``"extension"``: the C++ library's state.

    Implementations: ``"cpp-avx512_vnni"``, ``"cpp-avx2"`` (ditq's C++ kernels at
    that instruction set), ``"torch._int_mm"`` (PyTorch's oneDNN int8 GEMM, a
    library kernel: only where it beats float, see :func:`~ditq.kernels.cpu.levels.int_mm_is_fast`) and
    ``"reference"`` (the plain-PyTorch definition; layers keep their float path
    then). The weight-only ops name their paths by token count. Without
    ``build_now``, an extension that was not needed yet reports "not built yet"
    (and :func:`planned_backends` says what it would run).
    """
    if build_now:
        extension.build()
    state = extension.state
    if state.lib is not None:
        report = rule_table(extension.isa())
        ext = f"built ({ISAS[state.best_isa]}): {state.path}"
    elif not state.tried:
        return {"extension": "not built yet (builds on first use, or call ditq.kernels.cpu.build())"}
    else:
        report = rule_table(None)
        ext = f"unavailable: {state.error}"
    return {"extension": ext, **report}


def planned_backends() -> dict[str, str]:
    """:func:`available_backends` as it will be once the kernels are built, without building them:
    the instruction set read from the CPU's flags (capped as :func:`~ditq.kernels.cpu.extension.isa`
    caps it)."""
    if extension.state.tried:
        return {k: v for k, v in available_backends().items() if k != "extension"}
    return rule_table(capped(isa_from_flags()))
