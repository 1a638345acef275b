"""What the Triton kernels share: whether they run in Triton's interpreter, and the rounding cast.

Whether the kernels are compiled or interpreted is decided when this module is
imported, as Triton decides it when ``@triton.jit`` runs: ``TRITON_INTERPRET=1`` in
the environment before the import selects the interpreter (the kernels then run on
CPU tensors, each GEMM with one small autotuning config: the interpreter is slow and
cannot time configs).

This module imports Triton at the top: import it only when Triton is importable
(:mod:`ditq.kernels.triton` checks). No ``from __future__ import annotations`` here:
Triton reads the ``tl.constexpr`` annotations of kernel arguments as objects.
"""

import os

import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.3 reads its environment through knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET = _interpreting()
"""True when the kernels below run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""

_INTERPRETER_BF16 = tl.constexpr(INTERPRET)  # see cast


@triton.jit
def cast(y, dtype: tl.constexpr):
    """``y.to(dtype)``, rounding to nearest even.

    Compiled, that is all. Triton 3.9's interpreter truncates float -> bfloat16
    instead of rounding, so there the rounding to 8 significant bits is done on
    the float32 bits first (the conversion then drops zeros only).
    """
    if _INTERPRETER_BF16:
        if dtype == tl.bfloat16:
            bits = y.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)
