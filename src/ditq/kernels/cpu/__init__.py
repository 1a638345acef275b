"""CPU implementations of the ditq ops: small C++ kernels built on first use, with fallbacks.

Importing this package registers the implementations with :mod:`ditq.kernels.dispatch`
and compiles nothing. What runs, per op and instruction set, is one rule table measured
so that ``auto`` never runs a path slower than fp32 ``F.linear``. Results equal the
references bit for bit (the integer GEMMs, the quantizers), up to the summation order
(the weight-only GEMMs) or up to rare off-by-one codes at rounding boundaries (the fused
producers).

    extension  building and loading the C++ library (``csrc/``): :func:`build`, :func:`isa`,
               :func:`threads_used`; ``DITQ_CPU_KERNELS=0`` turns it off
    levels     instruction-set levels (:data:`ISAS`), what this CPU has, and the cap
               (:func:`set_isa`, ``DITQ_CPU_ISA``)
    rules      the rule table: :func:`rule_table`, :func:`available_backends`,
               :func:`planned_backends`
    prepack    the cache of the kernels' prepacked weights (:func:`clear_prepack_cache`)
    ops        the op implementations (the wrappers around the library's C functions)
"""

from ditq.kernels.cpu import ops  # registers the CPU implementations
from ditq.kernels.cpu.extension import ENV_DISABLE, build, isa, threads_used
from ditq.kernels.cpu.levels import AVX2, AVX512_VNNI, AVX_VNNI, ENV_ISA, ISAS, SCALAR, set_isa
from ditq.kernels.cpu.prepack import clear_prepack_cache, prepacked_bytes, prepacked_bytes_w4
from ditq.kernels.cpu.rules import available_backends, planned_backends, rule_table

__all__ = [
    "AVX2",
    "AVX512_VNNI",
    "AVX_VNNI",
    "ENV_DISABLE",
    "ENV_ISA",
    "ISAS",
    "SCALAR",
    "available_backends",
    "build",
    "clear_prepack_cache",
    "isa",
    "ops",
    "planned_backends",
    "prepacked_bytes",
    "prepacked_bytes_w4",
    "rule_table",
    "set_isa",
    "threads_used",
]
