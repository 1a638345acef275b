"""Which implementation of an op runs: the backends, their registry, and the fusion policy.

Fast implementations register per op and device type with :func:`register_impl`
(``ditq.kernels.cpu`` for CPUs, ``ditq.kernels.triton`` for CUDA); :func:`run` calls
the one for the tensors' device, or the plain-PyTorch reference
(:mod:`ditq.kernels.reference`) where none is registered or it declines the call
(returns ``NotImplemented``: a shape or dtype it does not handle).

**Backends.** Which implementation runs is chosen for the whole process with
:func:`set_backend` (or for a block, ``with use_backend(...)``): ``"auto"``
(default: the fast implementation of the tensors' device where one is
registered, else the reference), ``"reference"`` (always the ``ref_*``
functions), ``"cpu"`` or ``"triton"`` (that implementation, the reference
only where it declines a call). :func:`available_backends` lists what this
machine has; asking for anything else is a one-line :class:`KernelError`.

**Plans.** :func:`implementation` names what a call would run (on CPU, the rule
table of :mod:`ditq.kernels.cpu`, per op and instruction set) and
:func:`has_fast_impl` tells layers (``ditq.quant``) whether that is a fast
implementation, so that they can keep their float path where only an emulating
reference exists; :func:`should_fuse` tells a fused producer module
(``ditq.quant.fuse``) whether to run fused with its consumers' activation
quantization and hand them :class:`Int8Tokens`. Users reach all of this through :mod:`ditq.kernels.ops`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ditq.kernels.checks import KernelError
from ditq.kernels.reference import REFERENCE

OPS = (
    "quantize_per_token_int8",
    "quantize_per_token_asym",
    "layernorm_modulate_quantize_int8",
    "gelu_quantize_int8",
    "rmsnorm_modulate_quantize_int8",
    "swiglu_quantize_int8",
    "w8a8_linear",
    "w158a8_linear",
    "w4a8_linear",
    "ternary_linear",
    "int4_linear",
)
"""The ops, by name: ``torch.ops.ditq.<name>`` and ``ditq.kernels.ops.<name>``."""

BACKENDS = ("auto", "reference", "cpu", "triton")
"""Kernel backends one can ask for (see :func:`set_backend`)."""

_BACKEND_DEVICE = {"cpu": "cpu", "triton": "cuda"}  # backend -> device type its impls register under
_IMPLS: dict[str, dict[str, Callable]] = {name: {} for name in OPS}
_BACKEND_MODULES = ("ditq.kernels.cpu",)
_TRITON_MODULE = "ditq.kernels.triton"  # registers CUDA impls when imported; loaded only with CUDA
_backends_loaded = False
_triton_error: str | None = None  # why the Triton module did not import, if it did not
_backend = "auto"


def register_impl(op: str, device_type: str, fn: Callable | None) -> None:
    """Make ``fn`` the fast implementation of ``ditq::op`` on ``device_type`` ("cpu", "cuda"); None: remove.

    ``fn`` takes the op's arguments (already checked) and returns its result,
    or ``NotImplemented`` to let the reference handle the call.
    """
    if op not in _IMPLS:
        raise KernelError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if fn is None:
        _IMPLS[op].pop(device_type, None)
    else:
        _IMPLS[op][device_type] = fn


def registered_impl(op: str, device_type: str) -> Callable | None:
    """The fast implementation registered for ``op`` on ``device_type``, if any."""
    _load_backends()
    return _IMPLS[op].get(device_type)


def _load_backends() -> None:
    """Import the backend modules once (they register themselves; importing never compiles anything,
    and the Triton module imports Triton itself only where it can run: a CUDA device, or its
    interpreter)."""
    global _backends_loaded, _triton_error
    if not _backends_loaded:
        _backends_loaded = True
        for name in _BACKEND_MODULES:
            importlib.import_module(name)
        if _spec_exists(_TRITON_MODULE):
            try:
                importlib.import_module(_TRITON_MODULE)
            except Exception as exc:  # a broken Triton install must not break the CPU paths
                _triton_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _spec_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cpu_unavailable() -> str | None:
    """Why ditq's C++ CPU kernels cannot run here (None: built, or buildable on first use)."""
    from ditq.kernels import cpu

    ext = cpu.available_backends()["extension"]
    if ext.startswith("built"):
        return None
    if ext.startswith("unavailable"):
        return "the C++ CPU kernels are " + ext
    if os.environ.get(cpu.ENV_DISABLE, "1").strip().lower() in ("0", "off", "false", "no"):
        return f"the C++ CPU kernels are disabled by {cpu.ENV_DISABLE}={os.environ[cpu.ENV_DISABLE]}"
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build the CPU kernels"
    if shutil.which("ninja") is None and not _spec_exists("ninja"):
        return "no ninja to build the CPU kernels (pip install ninja)"
    return None


def _triton_unavailable() -> str | None:
    """Why the Triton backend cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _spec_exists("triton"):
        return "triton is not installed"
    if not _spec_exists(_TRITON_MODULE):
        return f"{_TRITON_MODULE} is missing from this installation"
    _load_backends()
    if _triton_error is not None:
        return f"{_TRITON_MODULE} does not import ({_triton_error})"
    if not any("cuda" in impls for impls in _IMPLS.values()):
        module = importlib.import_module(_TRITON_MODULE)
        why = getattr(module, "unavailable_reason", lambda: None)()
        return why or f"{_TRITON_MODULE} registered no CUDA implementation"
    return None


def _unavailable(name: str) -> str | None:
    if name == "cpu":
        return _cpu_unavailable()
    if name == "triton":
        return _triton_unavailable()
    return None


def available_backends() -> list[str]:
    """The concrete backends this machine has: ``"reference"`` always, ``"cpu"`` when ditq's C++ CPU
    kernels are built or can be built (a C++ compiler and ninja, not switched off by
    ``DITQ_CPU_KERNELS=0``), ``"triton"`` when Triton imports and a CUDA device is present.
    ``"auto"`` (always accepted) picks among them per device; nothing is built by asking."""
    return ["reference"] + [name for name in ("cpu", "triton") if _unavailable(name) is None]


def check_backend(name: str) -> str:
    """``name`` if it is a backend this machine can run, else a one-line :class:`KernelError` naming
    the available ones."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise KernelError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    why = _unavailable(name)
    if why is not None:
        have = ", ".join(["auto", *available_backends()])
        raise KernelError(f"kernel backend {name!r} is not available here ({why}); available: {have}")
    return name


def get_backend() -> str:
    """The kernel backend in force: ``"auto"`` (default), ``"reference"``, ``"cpu"`` or ``"triton"``."""
    return _backend


def set_backend(name: str) -> str:
    """Choose the implementation every ``torch.ops.ditq.*`` call runs, for the whole process; returns
    the previous choice.

    * ``"auto"``: the fast implementation registered for the tensors' device
      (C++ on CPU, Triton on CUDA) where there is one, the reference elsewhere;
      quantized layers then take their float path for an integer op that has
      only a reference on that device (see :func:`has_fast_impl`);
    * ``"reference"``: the plain-PyTorch ``ref_*`` functions, always;
    * ``"cpu"`` / ``"triton"``: that implementation (CPU / CUDA tensors only),
      the reference only where it declines a call (a shape it does not handle).

    An unknown or unavailable backend is a one-line :class:`KernelError`. See
    :func:`use_backend` for a scoped choice.
    """
    global _backend
    previous, _backend = _backend, check_backend(name)
    return previous


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[str]:
    """``with use_backend("reference"): ...``: :func:`set_backend` for the block, restored after.

    ``None`` leaves the current choice as it is (handy for optional arguments).
    """
    if name is None:
        yield _backend
        return
    previous = set_backend(name)
    try:
        yield name
    finally:
        set_backend(previous)


def resolve_backend(device: torch.device | str = "cpu", name: str | None = None) -> str:
    """The concrete backend ops on ``device``'s tensors run under ``name`` (default: the one in force):
    ``"cpu"``, ``"triton"`` or ``"reference"``. A forced backend on the other device type is a
    one-line :class:`KernelError`."""
    name = check_backend(_backend if name is None else name)
    dev = torch.device(device).type
    if name == "auto":
        if dev == "cpu" and _unavailable("cpu") is None:
            return "cpu"
        if dev == "cuda" and _unavailable("triton") is None:
            return "triton"
        return "reference"
    want = _BACKEND_DEVICE.get(name)
    if want is not None and want != dev:
        raise KernelError(
            f"kernel backend {name!r} runs on {want} tensors, not {dev} ones; use --device {want}, or "
            "backend 'auto' or 'reference'"
        )
    return name


def implementation(
    op: str,
    device: torch.device | str,
    backend: str | None = None,
    *,
    build: bool = True,
    w4a8_segment: int | None = None,
) -> str:
    """What a call of ``op`` on ``device`` runs under ``backend`` (default: the one in force):
    ``"reference"`` (the plain-PyTorch definition), ``"triton"`` on CUDA, or on CPU what
    :func:`ditq.kernels.cpu.available_backends` names (``"cpp-avx512_vnni"``, ``"cpp-avx2"``:
    ditq's C++ kernels at that instruction set; ``"torch._int_mm"``: PyTorch's oneDNN GEMM).

    The CPU choice is a rule table measured per op and instruction set (see
    :mod:`ditq.kernels.cpu`), so that ``"auto"`` never runs a path slower than the float one.
    ``build=False`` builds no CPU kernels to find out: kernels that are not built yet, but
    buildable, are reported as e.g. ``"cpp-avx2 (built on first use)"``. ``w4a8_segment`` (``gcd`` of the
    activation and weight group sizes) tells whether a W4A8 call fits the kernels at all: they
    need a multiple of 8 inputs (CPU) or 32 (Triton) and decline other shapes to the reference.
    """
    if op not in _IMPLS:
        raise KernelError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    name = _backend if backend is None else backend
    dev = torch.device(device).type
    if name == "reference" or (name != "auto" and _BACKEND_DEVICE.get(name) != dev):
        return "reference"
    _load_backends()
    if _IMPLS[op].get(dev) is None:
        return "reference"
    if op == "w4a8_linear" and w4a8_segment is not None and w4a8_segment % (8 if dev == "cpu" else 32):
        return "reference"  # the C++ kernels take whole blocks of 8 inputs, the Triton ones of 32
    if dev == "cpu":
        from ditq.kernels import cpu

        report = cpu.available_backends(build_now=build)
        if op not in report:  # not built yet (build=False): buildable means there on first use
            planned = cpu.planned_backends()[op]
            if _cpu_unavailable() is not None or not planned.startswith("cpp"):
                return cpu.rule_table(None)[op]
            return f"{planned} (built on first use)"
        return report[op]
    return "triton" if dev == "cuda" else name


def has_fast_impl(
    op: str,
    device: torch.device | str,
    backend: str | None = None,
    *,
    build: bool = True,
    w4a8_segment: int | None = None,
) -> bool:
    """Whether a call of ``op`` on ``device`` runs a fast implementation (not the reference) under
    ``backend`` (default: the one in force); see :func:`implementation` for the arguments. Layers
    (``ditq.quant``) keep their float path where it says no."""
    impl = implementation(op, device, backend, build=build, w4a8_segment=w4a8_segment)
    return impl != "reference"


@dataclass(frozen=True)
class Int8Tokens:
    """Activations already quantized per token by ``ops.quantize_per_token_int8``'s rule.

    What a producer fused with its quantization (``ops.layernorm_modulate_quantize_int8``,
    ``ops.gelu_quantize_int8``, ...) hands to the next integer linear instead of floats:
    ``q`` int8 ``[..., K]``, ``scale`` float32 ``[..., 1]``, and ``dtype``, the
    float dtype the activations had (the linear's output dtype). A layer takes
    them when its ``takes_int8_tokens(x)`` says so (see :func:`should_fuse`).
    """

    q: Tensor
    scale: Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device


_fusion = True  # see set_fusion


def set_fusion(enabled: bool) -> bool:
    """Let models run producers fused with their consumer's int8 quantization (default) or not
    (``False``: every integer linear quantizes its own float input); returns the previous setting.

    The numbers move by at most a code at rounding boundaries (see
    ``ops.layernorm_modulate_quantize_int8``); the switch is there to measure and to compare.
    """
    global _fusion
    previous, _fusion = _fusion, bool(enabled)
    return previous


@contextlib.contextmanager
def use_fusion(enabled: bool) -> Iterator[bool]:
    """``with use_fusion(False): ...``: :func:`set_fusion` for the block, restored after."""
    previous = set_fusion(enabled)
    try:
        yield bool(enabled)
    finally:
        set_fusion(previous)


def should_fuse(op: str, consumer, x: Tensor) -> bool:
    """Whether a producer of ``x``'s kind should run the fused ``op`` and hand :class:`Int8Tokens` to
    ``consumer`` rather than floats that ``consumer`` quantizes itself.

    Yes when ``consumer`` (any module) has a ``takes_int8_tokens(x)`` method that
    returns True (it would quantize ``x`` by the same rule and run an integer
    kernel) and ``op`` runs a fast implementation on ``x``'s device; under the
    ``"reference"`` backend too (both ways then run references, the fused one
    being the unfused composition). Elsewhere the unfused path is as fast and
    already has its own kernels. Never while :func:`set_fusion` has turned fusion off.
    """
    if not _fusion:
        return False
    takes = getattr(consumer, "takes_int8_tokens", None)
    if not callable(takes) or not takes(x):
        return False
    if _backend == "reference":
        return True
    if x.device.type == "cpu" and x.dtype != torch.float32:
        return False  # the CPU kernels of the fused ops take float32 (they decline the rest)
    return has_fast_impl(op, x.device, build=False)


def run(op: str, device: torch.device, *args):
    """Call ``op``'s implementation for ``device`` under the backend in force with ``args`` (checked by
    :mod:`ditq.kernels.ops`): the registered one, or the reference where there is none, it declines
    the call, or the backend is ``"reference"``."""
    _load_backends()
    name = _backend
    if name == "reference":
        return REFERENCE[op](*args)
    if name != "auto" and _BACKEND_DEVICE[name] != device.type:
        raise KernelError(
            f"{op}: kernel backend {name!r} runs on {_BACKEND_DEVICE[name]} tensors, got {device.type} "
            "ones; move the model, or choose backend 'auto' or 'reference'"
        )
    fn = _IMPLS[op].get(device.type)
    if fn is not None:
        out = fn(*args)
        if out is not NotImplemented:
            return out
    return REFERENCE[op](*args)
