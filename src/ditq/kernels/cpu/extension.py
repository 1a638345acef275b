"""Building and loading ditq's C++ CPU kernels (``csrc/``): once per process, on first use.

Nothing is compiled when ditq is imported; the first call that needs the kernels
(or :func:`build`) builds them with ``torch.utils.cpp_extension`` into
``$DITQ_CACHE/torch_extensions`` when ``DITQ_CACHE`` is set, else torch's default
extension folder, and later processes reuse that build. The C++ includes only
``<ATen/Parallel.h>`` and is called through ``ctypes`` (no Python module), so the
build takes seconds. No flag such as ``-march=native``: each SIMD path carries its
own target attribute and the CPU is checked at run time, so a cached build is safe
on another x86 machine (on other CPUs only the quantization runs in C++; the GEMMs
take the fallbacks of :mod:`ditq.kernels.cpu.rules`). If the build fails (no
compiler, no ninja, a compile error), a single warning says so and the ops fall back
as the rule table says for no kernels. ``DITQ_CPU_KERNELS=0`` turns the kernels off.

The build lists every file of :data:`SOURCES` and keys on :data:`HEADERS` too (see
:func:`csrc_digest`), so that an edit to any of them rebuilds the library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path

from ditq.kernels.cpu import levels

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(
    CSRC / f"{name}.cpp"
    for name in ("common", "quantize", "producers", "gemm_int8", "gemm_w4a8", "weight_only")
)
"""The C++ translation units of the library, one per op family (``csrc/common.h`` lists them)."""
HEADERS = (CSRC / "common.h",)
"""The headers they include (not compiled on their own; part of the build's key, see :func:`csrc_digest`)."""
EXT_NAME = "ditq_cpu_kernels"
ENV_DISABLE = "DITQ_CPU_KERNELS"


class _State:
    """What this process knows of the library: loaded or not, where from, and why not."""

    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.path: str | None = None
        self.best_isa = levels.SCALAR
        self.error: str | None = None  # why the library is unavailable
        self.tried = False
        self.warned = False
        self.lock = threading.Lock()


state = _State()
"""The build state (:func:`_reset_for_tests` replaces it: read it as ``extension.state``)."""


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "off", "false", "no")


def _build_directory() -> str | None:
    cache = os.environ.get("DITQ_CACHE")
    if not cache:
        return None  # torch's default ($TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/...)
    path = os.path.join(os.path.expanduser(cache), "torch_extensions", EXT_NAME)
    os.makedirs(path, exist_ok=True)
    return path


def csrc_digest() -> str:
    """A hash of every source and header (names and contents): part of the build's flags, so that
    ``torch.utils.cpp_extension``, which hashes the sources alone, rebuilds the library (under a new
    name, which a process that loaded the old one can load too) when any file changes."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _compile(verbose: bool) -> str:
    """Build (or find in the cache) the kernel library; returns its path. Raises on any failure.

    With OpenMP first (``-fopenmp``: at::parallel_for is a header template whose ``omp parallel``
    compiles into this library; without the flag every GEMM ran on one thread; torch's own libgomp
    is the one loaded, so ``torch.set_num_threads`` governs it); a compiler without OpenMP gets a
    one-thread build and a warning rather than no kernels.
    """
    for path in (*SOURCES, *HEADERS):
        if not path.is_file():
            raise FileNotFoundError(f"kernel source {path} is missing from the installed package")
    from torch.utils import cpp_extension

    key = f"-DDITQ_CSRC_DIGEST={csrc_digest()}"  # see csrc_digest

    def load(openmp: bool) -> str:
        flag = ["-fopenmp"] if openmp else []
        return cpp_extension.load(
            name=EXT_NAME,
            sources=[str(path) for path in SOURCES],
            extra_cflags=[
                "-O3",
                "-ffp-contract=off",
                key,
                *flag,
            ],  # no FMA contraction: the reference's epilogue
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
    reason is kept (see :func:`ditq.kernels.cpu.available_backends`) and one warning is issued.
    """
    with state.lock:
        if state.tried:
            return state.lib is not None
        state.tried = True
        if _disabled():
            state.error = f"disabled by {ENV_DISABLE}={os.environ.get(ENV_DISABLE)}"
            return False
        try:
            log.info("ditq: building the CPU kernels (once; cached by torch.utils.cpp_extension)")
            path = _compile(verbose)
            lib = _bind(path)
            state.best_isa = int(lib.ditq_best_isa())
            state.lib, state.path = lib, path
            return True
        except Exception as exc:  # no compiler, no ninja, a compile error, not x86, ...
            state.error = _one_line(exc)
            if not state.warned:
                state.warned = True
                warnings.warn(
                    f"ditq: the C++ CPU kernels are unavailable ({state.error}); using the "
                    "plain-PyTorch references (quantized layers keep their float path; w8a8_linear "
                    "takes torch._int_mm on CPUs with VNNI). Install a C++ compiler and ninja for "
                    "the fast paths.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False


def lib() -> ctypes.CDLL | None:
    """The loaded library, built on the first call; None where it is unavailable."""
    if not state.tried:
        build()
    return state.lib


def _reset_for_tests() -> None:
    """Forget the build state (tests simulate build failures with this)."""
    global state
    state = _State()  # the cap of set_isa lives in levels and stays


def isa() -> int:
    """The instruction set the kernels use now (index into :data:`~ditq.kernels.cpu.levels.ISAS`);
    builds the library if needed.

    The best the CPU has, capped by :func:`~ditq.kernels.cpu.levels.set_isa` or else by the
    ``DITQ_CPU_ISA`` environment variable (``DITQ_CPU_ISA=avx2 ditq demo`` runs what an AVX2-only
    CPU would)."""
    if lib() is None:
        return levels.SCALAR
    return levels.capped(state.best_isa)


def threads_used(items: int = 64) -> int:
    """How many threads the kernels' parallel loops run on now (``torch.set_num_threads`` sets it):
    distinct threads that ran ``items`` work items; 1 without the library."""
    library = lib()
    return 1 if library is None else int(library.ditq_threads_used(items))


def check(rc: int) -> None:
    """Raise the library's error message for a kernel's nonzero return code."""
    if rc != 0:
        msg = state.lib.ditq_last_error().decode(errors="replace")
        raise RuntimeError(f"ditq CPU kernel failed: {msg}")
