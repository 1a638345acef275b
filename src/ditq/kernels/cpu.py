"""CPU implementations of the ditq ops: small C++ kernels built on first use, with fallbacks.

What runs, per op and instruction set, is one rule table (:func:`rule_table`; for this machine
:func:`available_backends`, or :func:`planned_backends` before the build), measured so that
``auto`` never runs a path slower than fp32 ``F.linear`` (numbers, machines and commands:
``docs/benchmarks.md``, "Integer speed on every x86 CPU"):

* ``w8a8_linear``, ``w158a8_linear``, ``w4a8_linear``: ditq's C++ GEMMs
  (``csrc/cpu_kernels.cpp``) at every token count, on AVX-512 VNNI, AVX-VNNI and AVX2. Weights
  are *prepacked* once per weight tensor (cached, see below) into panels of 64 output columns
  that every level reads. With AVX-512 VNNI, a micro-kernel of 6 tokens x 64 columns keeps 24
  accumulators in registers and multiplies with ``vpdpbusd``: int8 weights flipped to unsigned
  (``w + 128``, the offset removed with per-token sums of x, bitnet.cpp's I2_S trick), ternary
  weights kept at 2 bits and unpacked in registers, int4 codes two per byte. With AVX2 only, a
  micro-kernel of 6 tokens x 8 columns uses, per weight kind, the product instruction that
  cannot saturate on it (AVX2's ``vpmaddubsw`` saturates its int16 pair sums, which is why
  MLAS and fbgemm lose exactness or drop to 7-bit activations there): ``vpmaddwd`` on int16 for
  int8 weights (two multiplies per 32 MACs, like the u8s8 pair, exact for every code), and
  ``vpmaddubsw`` with int16 accumulation for ternary codes (60 steps between widenings) and
  int4 codes (4 or 2). With AVX-VNNI (``avx_vnni``: Alder Lake, Sierra Forest, Zen 5 without
  AVX-512, or an AVX-512 VNNI CPU capped there, which runs the EVEX form), the same 6 x 8
  micro-kernel multiplies with 256-bit ``vpdpbusd`` straight into int32, as the AVX-512 one
  does. Results equal the references bit for bit. W4A8 needs both scales
  constant over segments of a multiple of 8 inputs (``gcd(ga, gw) % 8 == 0``); other layouts
  take the reference, and their layers keep the float path (``ops.implementation``).
* Without AVX2 (or without a compiler), ``w8a8_linear`` runs ``torch._int_mm`` (oneDNN) only
  where the CPU has int8 dot products (AVX-512 VNNI, AMX: 2-6x fp32); on an AVX2-only EPYC it
  ran at 0.03-0.10x fp32, so there, and for the other integer ops, the reference is what an op
  call runs and quantized layers keep their float path.
* ``quantize_per_token_int8``, ``quantize_per_token_asym`` and the producers fused with int8
  quantization (``layernorm_modulate_quantize_int8``, ``gelu_quantize_int8``,
  ``rmsnorm_modulate_quantize_int8``, ``swiglu_quantize_int8``; float32 inputs, others take
  the reference): per row, the producer (LayerNorm, RMSNorm with float64 sums, then the weight
  and adaLN modulation in the reference's order, each step rounded as eager does; GELU as
  ``x / (1 + exp(-2u))``, SiLU as PyTorch's ``g / (1 + exp(-g))``, with a Cephes ``exp`` in
  vector registers) into a per-thread buffer, quantized there: the float activation never
  goes to memory. AVX-512 and AVX2 paths. Codes equal the reference's but for rare off-by-ones
  at rounding boundaries.
* ``ternary_linear``, ``int4_linear`` (weight-only, float32 activations), on AVX2 and AVX-512:
  up to ``WEIGHT_ONLY_FUSED_MAX_M`` tokens the codes are decoded in registers and multiplied at
  once; up to ``WEIGHT_ONLY_DIRECT_MAX_M`` tokens, ditq's fp32 GEMM over 16 weight rows
  dequantized into a per-thread buffer (a ``vpermps`` table lookup per 16 codes, bit for bit
  the reference's weights); beyond, blocks of columns are dequantized into a buffer of
  ``DEQUANT_BLOCK_BYTES`` and multiplied by BLAS, so the float weight never exists whole. Only
  the summation order differs from the reference (relative error ~4e-7). ``w158a8_linear`` is
  faster than these at every M: the integer path is the fast one, weight-only the accurate one.

The instruction set is the best the CPU has; :func:`set_isa` or ``DITQ_CPU_ISA=avx2`` caps it,
so a lesser CPU's paths run and are tested on any x86 machine with AVX-512 VNNI.

**Prepacked weights** are cached per weight tensor (keyed by the tensor object,
its version counter and data pointer; dropped when the tensor is freed), on both SIMD
levels. They cost the weight's size again for int8, 2 bits per weight for ternary
(k4 + prepacked = 4 bits: 1/8 of float32) and 4 bits per weight plus an int32 code
sum per output and segment for int4 (keyed by the segment length too); W4A8's scales
and zero points are kept transposed beside them. :func:`clear_prepack_cache` empties it.

**Building**: nothing is compiled when ditq is imported; the first call that
needs the kernels builds them with ``torch.utils.cpp_extension`` (about 10 s:
the C++ includes only ``<ATen/Parallel.h>``; the library is called through
``ctypes``), into ``$DITQ_CACHE/torch_extensions`` when ``DITQ_CACHE``
is set, else torch's default extension folder, and later processes reuse it.
:func:`build` builds now. No flag such as ``-march=native`` is used: each SIMD
path carries its own target attribute and the CPU is checked at run time, so a
cached build is safe on another x86 machine (on other CPUs only the
quantization runs in C++; the GEMMs take the fallbacks above). If the build
fails (no compiler, no ninja, a compile error), a single warning says so and the
ops fall back as the rule table says for no kernels. ``DITQ_CPU_KERNELS=0`` turns
the C++ kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import threading
import warnings
import weakref
from pathlib import Path

import torch

from ditq.kernels import dispatch
from ditq.kernels.checks import KernelError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
EXT_NAME = "ditq_cpu_kernels"
ENV_DISABLE = "DITQ_CPU_KERNELS"
ENV_ISA = "DITQ_CPU_ISA"  # cap the instruction set (avx_vnni, avx2, scalar): a lesser CPU's paths
ISAS = ("scalar", "avx2", "avx_vnni", "avx512_vnni")
"""Instruction sets of the C++ kernels, in the numbering the library uses (0..3). ``avx_vnni`` is AVX2
with 256-bit ``vpdpbusd`` (AVX-VNNI, or AVX-512 VNNI's EVEX form when capped there): only the
integer GEMMs differ from ``avx2``."""
SCALAR, AVX2, AVX_VNNI, AVX512_VNNI = range(4)

# Weight-only ops: up to this many tokens ditq's GEMM (dequantized weights in a per-thread buffer);
# beyond, blocks of columns dequantized into a buffer of DEQUANT_BLOCK_BYTES and multiplied by BLAS.
WEIGHT_ONLY_DIRECT_MAX_M = 32
# Up to this many tokens (at most 4), the packed weights are decoded in registers (AVX2, AVX-512) and
# multiplied at once, without the buffer (the same numbers); 0 turns that path off.
WEIGHT_ONLY_FUSED_MAX_M = 4
DEQUANT_BLOCK_BYTES = 16 << 20
DEQUANT_BLOCK_MIN_COLS = 256


# ----------------------------------------------------------------------------
# Building and loading the library
# ----------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.path: str | None = None
        self.best_isa = SCALAR
        self.error: str | None = None  # why the library is unavailable
        self.tried = False
        self.warned = False
        self.forced_isa: int | None = None
        self.lock = threading.Lock()


_state = _State()


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "off", "false", "no")


def _build_directory() -> str | None:
    cache = os.environ.get("DITQ_CACHE")
    if not cache:
        return None  # torch's default ($TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/...)
    path = os.path.join(os.path.expanduser(cache), "torch_extensions", EXT_NAME)
    os.makedirs(path, exist_ok=True)
    return path


def _compile(verbose: bool) -> str:
    """Build (or find in the cache) the kernel library; returns its path. Raises on any failure.

    With OpenMP first (``-fopenmp``: at::parallel_for is a header template whose ``omp parallel``
    compiles into this library; without the flag every GEMM ran on one thread; torch's own libgomp
    is the one loaded, so ``torch.set_num_threads`` governs it); a compiler without OpenMP gets a
    one-thread build and a warning rather than no kernels.
    """
    if not SOURCE.is_file():
        raise FileNotFoundError(f"kernel source {SOURCE} is missing from the installed package")
    from torch.utils import cpp_extension

    def load(openmp: bool) -> str:
        flag = ["-fopenmp"] if openmp else []
        return cpp_extension.load(
            name=EXT_NAME,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-ffp-contract=off", *flag],  # no FMA contraction: the reference's epilogue
            extra_ldflags=flag,
            build_directory=_build_directory(),
            is_python_module=False,
            verbose=verbose,
        )

    try:
        return load(openmp=True)
    except Exception as exc:  # e.g. clang without libomp
        path = load(openmp=False)
        warnings.warn(
            f"ditq: the C++ CPU kernels were built without OpenMP ({_one_line(exc)}); they run on one "
            "thread. Install the compiler's OpenMP runtime (libgomp, libomp) for more.",
            RuntimeWarning,
            stacklevel=4,
        )
        return path


def _bind(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ditq_best_isa.restype = i64
    lib.ditq_best_isa.argtypes = []
    lib.ditq_threads_used.restype = i64
    lib.ditq_threads_used.argtypes = [i64]
    lib.ditq_last_error.restype = ctypes.c_char_p
    lib.ditq_last_error.argtypes = []
    lib.ditq_prepacked_bytes.restype = i64
    lib.ditq_prepacked_bytes.argtypes = [i64, i64, i64]
    for fn in (lib.ditq_prepack_w8, lib.ditq_prepack_w2):
        fn.restype = ctypes.c_int
        fn.argtypes = [p, i64, i64, p]
    for fn in (lib.ditq_w8a8_gemm, lib.ditq_w2a8_gemm):
        fn.restype = ctypes.c_int
        fn.argtypes = [p, p, p, p, p, i64, p, p, i64, i64, i64, i64]
    lib.ditq_prepacked_bytes_w4.restype = i64
    lib.ditq_prepacked_bytes_w4.argtypes = [i64, i64, i64]
    lib.ditq_prepack_w4.restype = ctypes.c_int
    lib.ditq_prepack_w4.argtypes = [p, i64, i64, i64, p]
    lib.ditq_w4a8_gemm.restype = ctypes.c_int
    lib.ditq_w4a8_gemm.argtypes = [p, i64, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64]
    lib.ditq_quantize_per_token.restype = ctypes.c_int
    lib.ditq_quantize_per_token.argtypes = [p, p, p, i64, i64, i64]
    lib.ditq_gelu_quantize.restype = ctypes.c_int
    lib.ditq_gelu_quantize.argtypes = [p, p, p, i64, i64, i64]
    lib.ditq_layernorm_modulate_quantize.restype = ctypes.c_int
    lib.ditq_layernorm_modulate_quantize.argtypes = [p, p, p, p, p, i64, i64, i64, ctypes.c_double, i64]
    lib.ditq_rmsnorm_modulate_quantize.restype = ctypes.c_int
    lib.ditq_rmsnorm_modulate_quantize.argtypes = [p, p, p, p, p, p, i64, i64, i64, ctypes.c_double, i64]
    lib.ditq_swiglu_quantize.restype = ctypes.c_int
    lib.ditq_swiglu_quantize.argtypes = [p, p, p, p, i64, i64, i64]
    lib.ditq_ternary_wo_gemm.restype = ctypes.c_int
    lib.ditq_ternary_wo_gemm.argtypes = [p, p, p, i64, p, p, i64, i64, i64, i64, i64]
    lib.ditq_int4_wo_gemm.restype = ctypes.c_int
    lib.ditq_int4_wo_gemm.argtypes = [p, p, p, p, i64, p, p, i64, i64, i64, i64, i64]
    lib.ditq_quantize_asym.restype = ctypes.c_int
    lib.ditq_quantize_asym.argtypes = [p, p, p, p, i64, i64, i64, i64]
    lib.ditq_ternary_dequant.restype = ctypes.c_int
    lib.ditq_ternary_dequant.argtypes = [p, p, i64, i64, i64, i64, i64, p, i64]
    lib.ditq_int4_dequant.restype = ctypes.c_int
    lib.ditq_int4_dequant.argtypes = [p, p, p, i64, i64, i64, i64, i64, p, i64]
    return lib


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    text = (errors or lines or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text}"[:300]


def build(verbose: bool = False) -> bool:
    """Build (or load from the cache) the C++ kernels now; True when they are usable.

    Called automatically by the first op that needs the kernels. On failure the
    reason is kept (see :func:`available_backends`) and one warning is issued.
    """
    with _state.lock:
        if _state.tried:
            return _state.lib is not None
        _state.tried = True
        if _disabled():
            _state.error = f"disabled by {ENV_DISABLE}={os.environ.get(ENV_DISABLE)}"
            return False
        try:
            log.info("ditq: building the CPU kernels (once; cached by torch.utils.cpp_extension)")
            path = _compile(verbose)
            lib = _bind(path)
            _state.best_isa = int(lib.ditq_best_isa())
            _state.lib, _state.path = lib, path
            return True
        except Exception as exc:  # no compiler, no ninja, a compile error, not x86, ...
            _state.error = _one_line(exc)
            if not _state.warned:
                _state.warned = True
                warnings.warn(
                    f"ditq: the C++ CPU kernels are unavailable ({_state.error}); using the "
                    "plain-PyTorch references (quantized layers keep their float path; w8a8_linear "
                    "takes torch._int_mm on CPUs with VNNI). Install a C++ compiler and ninja for "
                    "the fast paths.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False


def _lib() -> ctypes.CDLL | None:
    if not _state.tried:
        build()
    return _state.lib


def _reset_for_tests() -> None:
    """Forget the build state (tests simulate build failures with this)."""
    global _state
    forced = _state.forced_isa
    _state = _State()
    _state.forced_isa = forced


def _env_isa() -> int | None:
    name = os.environ.get(ENV_ISA, "").strip().lower()
    if not name:
        return None
    if name not in ISAS:
        raise KernelError(f"{ENV_ISA}={name!r} is not an instruction set; use one of {', '.join(ISAS)}")
    return ISAS.index(name)


def _capped(level: int) -> int:
    """``level`` capped by :func:`set_isa`, or else by ``DITQ_CPU_ISA``."""
    cap = _state.forced_isa if _state.forced_isa is not None else _env_isa()
    return level if cap is None else min(level, cap)


def isa() -> int:
    """The instruction set the kernels use now (index into :data:`ISAS`); builds the library if needed.

    The best the CPU has, capped by :func:`set_isa` or else by the ``DITQ_CPU_ISA`` environment
    variable (``DITQ_CPU_ISA=avx2 ditq demo`` runs what an AVX2-only CPU would)."""
    if _lib() is None:
        return SCALAR
    return _capped(_state.best_isa)


def threads_used(items: int = 64) -> int:
    """How many threads the kernels' parallel loops run on now (``torch.set_num_threads`` sets it):
    distinct threads that ran ``items`` work items; 1 without the library."""
    lib = _lib()
    return 1 if lib is None else int(lib.ditq_threads_used(items))


def set_isa(name: str | None) -> None:
    """Use at most instruction set ``name`` ("avx2", "scalar", ...) instead of the best; None: the best
    (or ``DITQ_CPU_ISA``'s cap where set).

    For tests and benchmarks (the fallback paths run on any machine this way).
    """
    if name is not None and name not in ISAS:
        raise KernelError(f"unknown instruction set {name!r}; use one of {', '.join(ISAS)} or None")
    _state.forced_isa = None if name is None else ISAS.index(name)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none), read once: the rule
    table asks on every forward of a layer without ditq's kernels (55 us a read here)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _int_mm_is_fast() -> bool:
    """Whether ``torch._int_mm`` (oneDNN) beats fp32 ``F.linear`` here: only with int8 dot-product
    instructions (AVX-512 VNNI, AMX). Measured: 2.2-5.7x fp32 on a Cascade Lake Xeon and a Zen 4
    EPYC (both AVX-512 VNNI), 0.03-0.10x on an AVX2-only EPYC, where it must never run."""
    return hasattr(torch, "_int_mm") and bool({"avx512_vnni", "amx_int8"} & _cpu_flags())


def rule_table(level: int | None) -> dict[str, str]:
    """What each op runs with ditq's kernels at instruction set ``level`` (None: not built).

    The rule table, measured per op and level on AVX-512 VNNI (Cascade Lake Xeon, Zen 4 EPYC) and
    AVX2 CPUs (an AVX2-only EPYC, and Zen 4 capped at AVX2), one thread, DiT-XL/2 and TerDiT-4.2B
    shapes, M = 1..4096 (``docs/benchmarks.md``): the integer GEMMs beat fp32 ``F.linear`` at
    every M on both SIMD levels, so they run at every M there; torch._int_mm only where it is
    fast (:func:`_int_mm_is_fast`); elsewhere the reference, whose layers keep their float path.
    A table rather than a per-machine calibration: the choice never flips with the shape on these
    CPUs, and a table gives the same answer on every run, in tests, and before anything is built.
    """
    cpp = f"cpp-{ISAS[level]}" if level is not None else None
    simd = cpp if level is not None and level >= AVX2 else None
    # everything but the integer GEMMs runs its AVX2 code on the avx_vnni level
    vec = f"cpp-{ISAS[AVX2 if level == AVX_VNNI else level]}" if level is not None else None
    wo = "reference"
    if simd:
        wo = f"{vec} (M <= {WEIGHT_ONLY_DIRECT_MAX_M}) / {vec} dequant + BLAS"
        if WEIGHT_ONLY_FUSED_MAX_M > 0:
            wo += f"; M <= {min(WEIGHT_ONLY_FUSED_MAX_M, 4)} decoded in registers"
    return {
        "quantize_per_token_int8": vec or "reference",
        "quantize_per_token_asym": vec or "reference",
        "layernorm_modulate_quantize_int8": vec or "reference",  # float32 inputs
        "gelu_quantize_int8": vec or "reference",
        "rmsnorm_modulate_quantize_int8": vec or "reference",
        "swiglu_quantize_int8": vec or "reference",
        "w8a8_linear": simd or ("torch._int_mm" if _int_mm_is_fast() else "reference"),
        "w158a8_linear": simd or "reference",
        "w4a8_linear": simd or "reference",  # segments of gcd(ga, gw) % 8 != 0: the reference
        "ternary_linear": wo,
        "int4_linear": wo,
    }


def available_backends(build_now: bool = False) -> dict[str, str]:
    """What each op runs on CPU now, plus ``"extension"``: the C++ library's state.

    Implementations: ``"cpp-avx512_vnni"``, ``"cpp-avx2"`` (ditq's C++ kernels at
    that instruction set), ``"torch._int_mm"`` (PyTorch's oneDNN int8 GEMM, a
    library kernel: only where it beats float, see :func:`_int_mm_is_fast`) and
    ``"reference"`` (the plain-PyTorch definition; layers keep their float path
    then). The weight-only ops name their paths by token count. Without
    ``build_now``, an extension that was not needed yet reports "not built yet"
    (and :func:`planned_backends` says what it would run).
    """
    if build_now:
        build()
    if _state.lib is not None:
        report = rule_table(isa())
        ext = f"built ({ISAS[_state.best_isa]}): {_state.path}"
    elif not _state.tried:
        return {"extension": "not built yet (builds on first use, or call ditq.kernels.cpu.build())"}
    else:
        report = rule_table(None)
        ext = f"unavailable: {_state.error}"
    return {"extension": ext, **report}


def _isa_from_flags() -> int:
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        return AVX512_VNNI
    if not {"avx2", "fma"} <= flags:
        return SCALAR
    return AVX_VNNI if "avx_vnni" in flags else AVX2


def planned_backends() -> dict[str, str]:
    """:func:`available_backends` as it will be once the kernels are built, without building them:
    the instruction set read from the CPU's flags (capped as :func:`isa` caps it)."""
    if _state.tried:
        return {k: v for k, v in available_backends().items() if k != "extension"}
    return rule_table(_capped(_isa_from_flags()))


def _check(rc: int) -> None:
    if rc != 0:
        msg = _state.lib.ditq_last_error().decode(errors="replace")
        raise RuntimeError(f"ditq CPU kernel failed: {msg}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


# ----------------------------------------------------------------------------
# Prepacked weights (every SIMD level)
# ----------------------------------------------------------------------------


class _PrepackCache:
    """Prepacked copies of weight tensors, keyed by the tensor object (dropped with it)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}
        self._lock = threading.Lock()
        # (key, weakref) of freed tensors, purged under the lock by the next get: a weakref callback
        # can run inside a garbage collection that a thread holding the lock set off, so taking
        # the lock there would deadlock (it did, once the cache held short-lived scale tensors)
        self._dead: list[tuple] = []

    @staticmethod
    def _stamp(w: torch.Tensor):
        try:
            version = w._version
        except RuntimeError:  # inference tensors have no version counter: data pointer only
            version = None
        return version, w.data_ptr(), tuple(w.shape)

    def _purge(self) -> None:
        while self._dead:
            key, ref = self._dead.pop()
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    def get(self, w: torch.Tensor, bits) -> torch.Tensor:
        key = (id(w), bits)
        stamp = self._stamp(w)
        with self._lock:
            self._purge()
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is w and hit[1] == stamp:
                return hit[2]
        packed = _prepack(w, bits)

        def drop(ref, key=key, dead=self._dead):
            dead.append((key, ref))  # list.append is atomic: no lock here (see __init__)

        with self._lock:
            self._purge()
            self._entries[key] = (weakref.ref(w, drop), stamp, packed)
        return packed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)


_prepacked = _PrepackCache()


def clear_prepack_cache() -> None:
    """Drop every cached prepacked weight (they are rebuilt on the next call)."""
    _prepacked.clear()


def _prepack(w: torch.Tensor, bits) -> torch.Tensor:
    """int8 ``[N, K]`` (bits 8), ternary k4 ``[N, K/4]`` (bits 2) or int4 ``[N, K/2]`` (bits
    ``("int4", L)``: with the codes' sums per segment of L inputs) -> the SIMD kernels' layout;
    ``("t", dtype)``: a per-group weight parameter ``[N, G]`` -> ``[G, N]`` in ``dtype`` (the W4A8
    kernel reads scales and zero points by group; transposing them per call cost as much as the
    GEMM at one token)."""
    lib = _state.lib
    if isinstance(bits, tuple) and bits[0] == "t":
        return w.to(bits[1]).t().contiguous()
    if isinstance(bits, tuple):  # ("int4", L)
        n, k, seg = w.shape[0], w.shape[1] * 2, bits[1]
        out = torch.empty(int(lib.ditq_prepacked_bytes_w4(n, k, seg)), dtype=torch.uint8)
        _check(lib.ditq_prepack_w4(w.contiguous().data_ptr(), n, k, seg, out.data_ptr()))
        return out
    n = w.shape[0]
    k = w.shape[1] if bits == 8 else w.shape[1] * 4
    src = w.contiguous()
    out = torch.empty(int(lib.ditq_prepacked_bytes(n, k, bits)), dtype=torch.uint8)
    fn = lib.ditq_prepack_w8 if bits == 8 else lib.ditq_prepack_w2
    _check(fn(src.data_ptr(), n, k, out.data_ptr()))
    return out


def prepacked_bytes(n: int, k: int, bits: int) -> int:
    """Bytes of the prepacked copy of an ``[n, k]`` weight (bits 8 or 2) the SIMD kernels keep."""
    lib = _lib()
    if lib is None:
        return 0
    return int(lib.ditq_prepacked_bytes(n, k, bits))


def prepacked_bytes_w4(n: int, k: int, seg: int) -> int:
    """Bytes of the W4A8 prepacked copy of an ``[n, k]`` int4 weight (codes + sums per ``seg`` inputs)."""
    lib = _lib()
    if lib is None:
        return 0
    return int(lib.ditq_prepacked_bytes_w4(n, k, seg))


# ----------------------------------------------------------------------------
# Op implementations (arguments were checked by ditq.kernels.ops)
# ----------------------------------------------------------------------------


def _alloc(shape, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer for a kernel, which writes every element (tests poison buffers through this hook)."""
    return torch.empty(shape, dtype=dtype)


def _all_cpu(*ts) -> bool:
    return all(t is None or t.device.type == "cpu" for t in ts)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t  # the kernels read it flat
    return t.reshape(-1).to(torch.float32).contiguous()


def _quantize_rows(fn: str, x: torch.Tensor, group: int, code_dtype: torch.dtype, n_params: int, *extra):
    """Run the library's row quantizer ``fn(x, q, *params, rows, group, *extra, isa)`` over the rows of
    ``group`` inputs (0: whole tokens): codes ``code_dtype [..., K]``, ``n_params`` float32
    ``[..., K/group]``; NotImplemented without the library or for an empty ``x``."""
    if _lib() is None or x.numel() == 0:
        return NotImplemented
    k = x.shape[-1]
    g = k if group == 0 else group
    xf = x.to(torch.float32).contiguous()
    q = _alloc(x.shape, code_dtype)
    params = [_alloc((*x.shape[:-1], k // g), torch.float32) for _ in range(n_params)]
    ptrs = (xf.data_ptr(), q.data_ptr(), *(p.data_ptr() for p in params))
    _check(getattr(_state.lib, fn)(*ptrs, xf.numel() // g, g, *extra, isa()))
    return (q, *params)


def quantize_per_token_int8(x: torch.Tensor, group: int):
    return _quantize_rows("ditq_quantize_per_token", x, group, torch.int8, 1)


def quantize_per_token_asym(x: torch.Tensor, bits: int, group: int):
    return _quantize_rows("ditq_quantize_asym", x, group, torch.uint8, 2, bits)


def gelu_quantize_int8(x: torch.Tensor):
    # float32 only: other dtypes round between the steps (the reference runs for them)
    if x.dtype != torch.float32:
        return NotImplemented
    return _quantize_rows("ditq_gelu_quantize", x, 0, torch.int8, 1)


def layernorm_modulate_quantize_int8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    if _lib() is None or x.numel() == 0 or x.dtype != torch.float32:
        return NotImplemented
    b, t, k = x.shape
    xf, sh, sc = x.contiguous(), shift.contiguous(), scale.contiguous()
    q, s = _alloc(x.shape, torch.int8), _alloc((b, t, 1), torch.float32)
    ptrs = (xf.data_ptr(), sh.data_ptr(), sc.data_ptr(), q.data_ptr(), s.data_ptr())
    _check(_state.lib.ditq_layernorm_modulate_quantize(*ptrs, b, t, k, float(eps), isa()))
    return q, s


def rmsnorm_modulate_quantize_int8(x, weight, shift, scale, eps: float):
    """RMSNorm (float64 sum of squares) * weight, adaLN modulation, int8 per token: float32 only."""
    if _lib() is None or x.numel() == 0 or x.dtype != torch.float32 or not _all_cpu(x, weight, shift, scale):
        return NotImplemented
    b, t, k = x.shape
    args = (x.contiguous(), weight.contiguous(), shift.contiguous(), scale.contiguous())
    q, s = _alloc(x.shape, torch.int8), _alloc((b, t, 1), torch.float32)
    ptrs = (*(a.data_ptr() for a in args), q.data_ptr(), s.data_ptr())
    _check(_state.lib.ditq_rmsnorm_modulate_quantize(*ptrs, b, t, k, float(eps), isa()))
    return q, s


def swiglu_quantize_int8(gate, up):
    """``silu(gate) * up`` quantized per token, one pass: float32 only."""
    if _lib() is None or gate.numel() == 0 or gate.dtype != torch.float32 or not _all_cpu(gate, up):
        return NotImplemented
    k = gate.shape[-1]
    g, u = gate.contiguous(), up.contiguous()
    q, s = _alloc(gate.shape, torch.int8), _alloc((*gate.shape[:-1], 1), torch.float32)
    ptrs = (g.data_ptr(), u.data_ptr(), q.data_ptr(), s.data_ptr())
    _check(_state.lib.ditq_swiglu_quantize(*ptrs, g.numel() // k, k, isa()))
    return q, s


def _int_mm_w8a8(x2, xs32, wq, ws32, b32):
    """torch._int_mm (oneDNN) + the reference epilogue; None when this torch/CPU cannot run it."""
    if x2.shape[1] < 2:  # torch 2.13's CPU _int_mm returns wrong sums for K = 1 (found by our tests)
        return None
    try:
        acc = torch._int_mm(x2, wq.t())
    except (RuntimeError, AttributeError):
        return None
    y = acc.float() * xs32.reshape(-1, 1) * ws32.reshape(1, -1)
    return y + b32 if b32 is not None else y


def _gemm(fn, x2, xs32, w, wpre, ws32, b32, n: int, level: int) -> torch.Tensor:
    """One call of the library's W8A8 / W1.58A8 GEMM: float32 ``[M, N]``."""
    m, k = x2.shape
    wc = w.contiguous()
    out = _alloc((m, n), torch.float32)
    per_row = int(ws32.numel() != 1)
    args = (x2, xs32, wc, wpre, ws32)
    _check(fn(*(_ptr(t) for t in args), per_row, _ptr(b32), out.data_ptr(), m, n, k, level))
    return out


def w8a8_linear(xq, xs, wq, ws, bias, out_dtype):
    if not _all_cpu(xs, wq, ws, bias):
        return NotImplemented
    k, n = xq.shape[-1], wq.shape[0]
    x2 = xq.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return NotImplemented
    xs32, ws32, b32 = _f32(xs), _f32(ws), _f32(bias)
    level = isa() if _lib() is not None else SCALAR
    if level >= AVX2:
        out = _gemm(_state.lib.ditq_w8a8_gemm, x2, xs32, wq, _prepacked.get(wq, 8), ws32, b32, n, level)
    elif _int_mm_is_fast():
        out = _int_mm_w8a8(x2, xs32, wq, ws32, b32)
        if out is None:
            return NotImplemented
    else:
        return NotImplemented
    out = out.reshape(*xq.shape[:-1], n)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def w158a8_linear(xq, xs, w_packed, w_scale, bias, out_dtype):
    if not _all_cpu(xs, w_packed, w_scale, bias) or _lib() is None:
        return NotImplemented
    level = isa()
    if level < AVX2:
        return NotImplemented  # the scalar C loop is slower than the reference's BLAS
    k, n = xq.shape[-1], w_packed.shape[0]
    x2 = xq.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return NotImplemented
    xs32, ws32, b32 = _f32(xs), _f32(w_scale), _f32(bias)
    wpre = _prepacked.get(w_packed, 2)
    out = _gemm(_state.lib.ditq_w2a8_gemm, x2, xs32, w_packed, wpre, ws32, b32, n, level)
    out = out.reshape(*xq.shape[:-1], n)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def w4a8_linear(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype):
    """AVX2 or AVX-512 VNNI, where both scales are constant over segments of a multiple of 8 inputs
    (``gcd(ga, gw) % 8 == 0``); anything else goes to the reference."""
    if not _all_cpu(xq, xs, x_zero, w_packed, w_scale, w_zero, bias) or _lib() is None:
        return NotImplemented
    level = isa()
    if level < AVX2:
        return NotImplemented
    k, n = xq.shape[-1], w_packed.shape[0]
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return NotImplemented
    ga = k // (xs.numel() // m)  # activation group: K (per token) or a divisor of K
    gw = k // w_scale.shape[1]
    seg = math.gcd(ga, gw)
    if seg % 8:
        return NotImplemented
    x2 = x2.contiguous()
    xs32, b32 = _f32(xs), _f32(bias)
    xz = None if x_zero is None else x_zero.reshape(-1).to(torch.int32).contiguous()
    ws_t = _prepacked.get(w_scale, ("t", torch.float32))  # [K/gw, N]
    wz_t = _prepacked.get(w_zero, ("t", torch.int32))
    wpre = _prepacked.get(w_packed, ("int4", seg))
    out = _alloc((m, n), torch.float32)
    unsigned = int(xq.dtype == torch.uint8)
    args = (_ptr(x2), unsigned, _ptr(xs32), _ptr(xz), _ptr(wpre), _ptr(ws_t), _ptr(wz_t), _ptr(b32))
    _check(_state.lib.ditq_w4a8_gemm(*args, out.data_ptr(), m, n, k, gw, ga, level))
    out = out.reshape(*xq.shape[:-1], n)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _weight_only_ready(x, *params) -> bool:
    """Whether the weight-only kernels take this call: float32 CPU tensors on a SIMD CPU."""
    if not _all_cpu(x, *params) or x.dtype != torch.float32 or _lib() is None:
        return False
    return isa() >= AVX2 and x.numel() > 0


def _weight_only(x, n: int, direct, dequant, bias) -> torch.Tensor:
    """``x [..., K] -> [..., N]``: up to :data:`WEIGHT_ONLY_DIRECT_MAX_M` tokens ``direct(x2, out)``
    (the C++ GEMM); beyond, blocks of output columns dequantized by ``dequant(n0, n1, buf)`` into a
    buffer of :data:`DEQUANT_BLOCK_BYTES` (at least :data:`DEQUANT_BLOCK_MIN_COLS` columns) and
    multiplied by BLAS (``torch.addmm``)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = _alloc((m, n), torch.float32)
    if m <= WEIGHT_ONLY_DIRECT_MAX_M:
        direct(x2, out)
    else:
        # BLAS wants wide blocks
        cols = max(DEQUANT_BLOCK_MIN_COLS, DEQUANT_BLOCK_BYTES // (4 * k) // 16 * 16)
        buf = torch.empty(min(cols, n), k, dtype=torch.float32)
        for n0 in range(0, n, cols):
            n1 = min(n, n0 + cols)
            w = buf[: n1 - n0]
            dequant(n0, n1, w)
            out[:, n0:n1] = x2 @ w.t() if bias is None else torch.addmm(bias[n0:n1], x2, w.t())
    return out.reshape(*x.shape[:-1], n)


def ternary_linear(x, w_packed, scale, bias):
    """Float32 activations only (other dtypes: the reference)."""
    if not _weight_only_ready(x, w_packed, scale, bias) or w_packed.shape[0] == 0:
        return NotImplemented
    k, n, level, lib = x.shape[-1], w_packed.shape[0], isa(), _state.lib
    wc = w_packed.contiguous()
    s32, b32 = _f32(scale), _f32(bias)  # ±s and 0 are exact in any float dtype: the same weights
    per_row = int(s32.numel() != 1)

    def direct(x2, out):
        args = (x2.data_ptr(), wc.data_ptr(), s32.data_ptr(), per_row, _ptr(b32), out.data_ptr())
        _check(lib.ditq_ternary_wo_gemm(*args, x2.shape[0], n, k, level, WEIGHT_ONLY_FUSED_MAX_M))

    def dequant(n0, n1, buf):
        args = (wc.data_ptr(), s32.data_ptr(), per_row, n, k, n0, n1, buf.data_ptr())
        _check(lib.ditq_ternary_dequant(*args, level))

    return _weight_only(x, n, direct, dequant, b32)


def int4_linear(x, w_packed, w_scale, w_zero, bias):
    """Float32 activations and float32 scales/zero points only (the reference dequantizes in the
    scale's dtype)."""
    if not _weight_only_ready(x, w_packed, w_scale, w_zero, bias) or w_packed.shape[0] == 0:
        return NotImplemented
    if w_scale.dtype != torch.float32 or w_zero.dtype != torch.float32:
        return NotImplemented
    k, n, level, lib = x.shape[-1], w_packed.shape[0], isa(), _state.lib
    wc, sc, zc = w_packed.contiguous(), w_scale.contiguous(), w_zero.contiguous()
    group, b32 = k // w_scale.shape[1], _f32(bias)

    def direct(x2, out):
        args = (x2.data_ptr(), wc.data_ptr(), sc.data_ptr(), zc.data_ptr(), group, _ptr(b32), out.data_ptr())
        _check(lib.ditq_int4_wo_gemm(*args, x2.shape[0], n, k, level, WEIGHT_ONLY_FUSED_MAX_M))

    def dequant(n0, n1, buf):
        args = (wc.data_ptr(), sc.data_ptr(), zc.data_ptr(), group, n, k, n0, n1, buf.data_ptr())
        _check(lib.ditq_int4_dequant(*args, level))

    return _weight_only(x, n, direct, dequant, b32)


dispatch.register_impl("quantize_per_token_int8", "cpu", quantize_per_token_int8)
dispatch.register_impl("quantize_per_token_asym", "cpu", quantize_per_token_asym)
dispatch.register_impl("layernorm_modulate_quantize_int8", "cpu", layernorm_modulate_quantize_int8)
dispatch.register_impl("gelu_quantize_int8", "cpu", gelu_quantize_int8)
dispatch.register_impl("rmsnorm_modulate_quantize_int8", "cpu", rmsnorm_modulate_quantize_int8)
dispatch.register_impl("swiglu_quantize_int8", "cpu", swiglu_quantize_int8)
dispatch.register_impl("ternary_linear", "cpu", ternary_linear)
dispatch.register_impl("int4_linear", "cpu", int4_linear)
dispatch.register_impl("w4a8_linear", "cpu", w4a8_linear)
dispatch.register_impl("w8a8_linear", "cpu", w8a8_linear)
dispatch.register_impl("w158a8_linear", "cpu", w158a8_linear)
