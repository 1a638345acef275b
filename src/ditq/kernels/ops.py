"""Low-bit operators: ``torch.library`` custom ops (namespace ``ditq``), each with a plain-PyTorch reference.

Every op here is one operator with three parts:

* a **reference implementation** in plain PyTorch (the ``ref_*`` functions), the
  definition of what the op computes. Integer parts are exact: products of
  integer codes are summed exactly (in float64, which holds every integer below
  2^53; the sums here stay below 2^31) and converted to int32, as an int32
  accumulator would hold them; then a float32 epilogue applies the scales;
* a **fake (meta) implementation**, so the ops trace under ``torch.compile`` and
  ``torch.export``;
* a **dispatch point**: fast implementations register per device type with
  :func:`register_impl` (``ditq.kernels.cpu`` for CPUs, ``ditq.kernels.triton``
  for CUDA) and are tested against the reference. An implementation may
  decline a call (return ``NotImplemented``: a shape or dtype it does not
  handle); the reference runs then.

**Backends.** Which implementation runs is chosen for the whole process with
:func:`set_backend` (or for a block, ``with use_backend(...)``): ``"auto"``
(default: the fast implementation of the tensors' device where one is
registered, else the reference), ``"reference"`` (always the ``ref_*``
functions), ``"cpu"`` or ``"triton"`` (that implementation, the reference
only where it declines a call). :func:`available_backends` lists what this
machine has; asking for anything else is a one-line :class:`KernelError`.
:func:`has_fast_impl` tells layers (``ditq.quant``) whether an op would run a
fast implementation, so that they can keep their float path where only an
emulating reference exists; :func:`should_fuse` tells a model whether to run
a producer fused with its consumer's activation quantization and hand the
consumer :class:`Int8Tokens`.

Ops (call them as ``torch.ops.ditq.<name>`` or through the Python functions of
the same name below; arguments are checked, with a one-line :class:`KernelError`)::

    quantize_per_token_int8(x, group=0)              -> (q int8, scale float32)
    quantize_per_token_asym(x, bits, group=0)        -> (q uint8, scale float32, zero float32), Q-DiT's rule
    layernorm_modulate_quantize_int8(x, shift, scale, eps)
                                                     -> (q int8, scale float32): DiT's norm + adaLN
                                                     modulation, then quantize_per_token_int8, one pass
    gelu_quantize_int8(x)                            -> (q int8, scale float32): GELU (tanh), then
                                                     quantize_per_token_int8, one pass
    rmsnorm_modulate_quantize_int8(x, weight, shift, scale, eps)
                                                     -> (q int8, scale float32): Large-DiT's RMSNorm +
                                                     adaLN modulation, then quantize_per_token_int8
    swiglu_quantize_int8(gate, up)                   -> (q int8, scale float32): silu(gate) * up, then
                                                     quantize_per_token_int8, one pass
    w8a8_linear(xq, xs, wq, ws, bias, out_dtype)     int8 activations x int8 weights
    w158a8_linear(xq, xs, w_packed, w_scale, bias, out_dtype)
                                                     int8 activations x ternary (2-bit "k4") weights
    w4a8_linear(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype)
                                                     Q-DiT group-wise: int4 weights, 8-bit activations
    ternary_linear(x, w_packed, scale, bias)         weight-only ternary, float activations
    int4_linear(x, w_packed, w_scale, w_zero, bias)  weight-only group-wise int4, float activations

Shapes: activations are ``[..., K]`` (any leading axes, M = their product),
weights ``[N, K]`` before packing (N output features), outputs ``[..., N]``.
Packed layouts are those of :mod:`ditq.kernels.packing` (int4: two codes per
byte along K; ternary: ``"k4"``, codes ``w + 1``). The ops are for inference:
they have no autograd formula.

Accumulation is int32, so K is at most :data:`MAX_K` for the integer ops.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ditq.errors import DitqError
from ditq.kernels.packing import unpack_2bit, unpack_int4

NAMESPACE = "ditq"

MAX_K = 65536
"""Most inputs an integer op takes: |int8 x int8| <= 2^14 per product, so int32 sums fit up to 2^17."""

ACT_EPS = 1e-5
"""Floor on a token's max |x| in :func:`quantize_per_token_int8` (BitNet b1.58's; keeps scales finite)."""

RANGE_EPS = 1e-5
"""Floor on a row's max - min in :func:`quantize_per_token_asym` (``ditq.quant.primitives.RANGE_EPS``)."""

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


class KernelError(DitqError, ValueError):
    """Arguments an op cannot take (wrong dtype, shape or layout), or a backend or instruction set
    this machine lacks: a one-line message, which the CLI prints as such."""


# ----------------------------------------------------------------------------
# Dispatch point and backend selection
# ----------------------------------------------------------------------------

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
    """Activations already quantized per token by :func:`quantize_per_token_int8`'s rule.

    What a producer fused with its quantization (:func:`layernorm_modulate_quantize_int8`,
    :func:`gelu_quantize_int8`) hands to the next integer linear instead of floats:
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
    :func:`layernorm_modulate_quantize_int8`); the switch is there to measure and to compare.
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


def _dispatch(op: str, device: torch.device, *args):
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


def _plain(v) -> bool:
    """Whether ``v`` is no tensor, or an eager tensor that needs no gradient (not a fake, meta or
    subclass tensor, as tracing and ``torch.compile`` pass)."""
    if not isinstance(v, Tensor):
        return True
    return type(v) is Tensor and v.device.type != "meta" and not (v.requires_grad and torch.is_grad_enabled())


def _op(name: str):
    """Define ``fn`` as the custom op ``torch.ops.ditq.<name>`` and return a function that runs ``fn``
    directly on plain eager tensors, and the custom op everywhere else.

    The custom op makes the ops traceable (fake implementations, ``torch.compile``,
    ``torch.export``) and refuses inputs that want gradients; on eager tensors its dispatch
    (autograd wrapper, dynamo guard, redispatch) cost ~35 us a call, as much as the GEMM itself
    for a small layer at a few tokens, and nothing it does changes the result there. The
    returned function keeps ``register_fake`` and ``custom_op`` (the op definition).
    """

    def define(fn):
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling() or not all(map(_plain, (*args, *kwargs.values()))):
                return custom(*args, **kwargs)
            return fn(*args, **kwargs)

        call.register_fake = custom.register_fake
        call.custom_op = custom
        return call

    return define


# ----------------------------------------------------------------------------
# Argument checks (shapes and dtypes only: they run on fake tensors too)
# ----------------------------------------------------------------------------


def _fail(op: str, msg: str):
    raise KernelError(f"{op}: {msg}")


def _check_tensor(op: str, name: str, t, dtypes=None, dim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if dtypes == "float":
        if not t.is_floating_point():
            _fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")
    elif dtypes is not None and t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        _fail(op, f"{name} must be {want}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_acts(op: str, x: Tensor, name: str, dtypes, max_k: bool = True) -> int:
    """K of activations ``x [..., K]``."""
    _check_tensor(op, name, x, dtypes)
    if x.dim() == 0 or x.shape[-1] == 0:
        _fail(op, f"{name} must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if max_k and k > MAX_K:
        _fail(op, f"K = {k} exceeds {MAX_K} (int32 accumulation); split the layer's inputs")
    return k


def _check_token_params(op: str, name: str, p: Tensor, x: Tensor) -> int:
    """Number of groups G of per-token parameters ``p [..., G]`` for activations ``x [..., K]``."""
    _check_tensor(op, name, p, "float")
    lead = tuple(x.shape[:-1])
    if tuple(p.shape) == lead:  # one per token, without the group axis
        return 1
    if p.dim() != x.dim() or tuple(p.shape[:-1]) != lead or p.shape[-1] == 0 or x.shape[-1] % p.shape[-1]:
        _fail(
            op,
            f"{name} must be [..., G] with the leading shape {lead} of the activations and G dividing "
            f"K = {x.shape[-1]}, got {tuple(p.shape)}",
        )
    return p.shape[-1]


def _check_out_scale(op: str, name: str, s: Tensor, n: int) -> None:
    """A per-tensor (1 element) or per-output-channel (N elements) scale."""
    _check_tensor(op, name, s, "float")
    if s.numel() not in (1, n):
        _fail(
            op, f"{name} must hold 1 value (per tensor) or N = {n} (per output channel), got {tuple(s.shape)}"
        )


def _check_bias(op: str, bias: Tensor | None, n: int) -> None:
    if bias is not None:
        _check_tensor(op, "bias", bias, "float")
        if tuple(bias.shape) != (n,):
            _fail(op, f"bias must be [N] = [{n}], got {tuple(bias.shape)}")


def _check_out_dtype(op: str, out_dtype) -> None:
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        _fail(op, f"out_dtype must be a floating-point dtype, got {out_dtype}")


def _check_group_params(op: str, scale: Tensor, zero: Tensor, n: int, k: int) -> int:
    """Group size of weight parameters ``[N, K/g]`` (Q-DiT's ``w_scale``/``w_zero``)."""
    _check_tensor(op, "w_scale", scale, "float", dim=2)
    _check_tensor(op, "w_zero", zero, "float", dim=2)
    if scale.shape != zero.shape or scale.shape[0] != n or scale.shape[1] == 0 or k % scale.shape[1]:
        _fail(
            op,
            f"w_scale and w_zero must both be [N, K/g] = [{n}, K/g] with g dividing K = {k}, got "
            f"{tuple(scale.shape)} and {tuple(zero.shape)}",
        )
    return k // scale.shape[1]


def _check_int4_weight(op: str, w_packed: Tensor, k: int) -> int:
    """N of int4 weights packed two per byte: uint8 ``[N, K/2]``."""
    _check_tensor(op, "w_packed", w_packed, (torch.uint8,), dim=2)
    if k % 2 or w_packed.shape[1] * 2 != k:
        _fail(
            op,
            f"w_packed must be uint8 [N, K/2] (int4, two per byte) for K = {k}, got {tuple(w_packed.shape)}",
        )
    return w_packed.shape[0]


def _check_ternary_weight(op: str, w_packed: Tensor, k: int) -> int:
    """N of ternary weights packed "k4": uint8 ``[N, K/4]``."""
    _check_tensor(op, "w_packed", w_packed, (torch.uint8,), dim=2)
    if k % 4 or w_packed.shape[1] * 4 != k:
        _fail(
            op,
            f"w_packed must be uint8 [N, K/4] (ternary, 'k4' layout) for K = {k}; K must be a multiple "
            f"of 4, got {tuple(w_packed.shape)}",
        )
    return w_packed.shape[0]


# ----------------------------------------------------------------------------
# Reference helpers
# ----------------------------------------------------------------------------


def _int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a @ b.T`` of integer-valued tensors ``a [M, K]``, ``b [N, K]`` as int32 ``[M, N]``.

    Summed in float64, exact for every integer below 2^53 (the sums here are below 2^31): the
    int32 accumulator of a kernel holds the same numbers.
    """
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int32)


def _per_token(xs: Tensor, m: int) -> Tensor:
    return xs.reshape(m, 1).float()


def _per_out(s: Tensor, n: int) -> Tensor:
    return s.reshape(1, -1).float().expand(1, n)


def _epilogue(acc: Tensor, xs: Tensor, ws: Tensor, bias: Tensor | None) -> Tensor:
    """``float(acc) * xs * ws + bias`` in float32, in this order (the kernels' order too)."""
    y = acc.float() * xs * ws
    return y + bias.float() if bias is not None else y


# ----------------------------------------------------------------------------
# Reference implementations
# ----------------------------------------------------------------------------


def ref_quantize_per_token_int8(x: Tensor, group: int = 0) -> tuple[Tensor, Tensor]:
    """Reference of :func:`quantize_per_token_int8`."""
    k = x.shape[-1]
    g = k if group == 0 else group
    rows = x.float().reshape(*x.shape[:-1], k // g, g)
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    inv = amax.reciprocal() * 127.0  # = `127.0 / amax` in PyTorch, BitNet's (and ditq.quant.ternary's) scale
    q = torch.clamp(torch.round(rows * inv), -128, 127).to(torch.int8).reshape(x.shape)
    return q, (amax / 127.0).squeeze(-1)


def ref_quantize_per_token_asym(x: Tensor, bits: int, group: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`quantize_per_token_asym`."""
    k = x.shape[-1]
    g = k if group == 0 else group
    rows = x.float().reshape(*x.shape[:-1], k // g, g)
    q_max = float(2**bits - 1)
    hi, lo = rows.amax(dim=-1, keepdim=True), rows.amin(dim=-1, keepdim=True)
    scale = (hi - lo).clamp(min=RANGE_EPS) / q_max
    zero = torch.round(-lo / scale).clamp(0.0, q_max)
    q = torch.clamp(torch.round(rows / scale) + zero, 0.0, q_max).to(torch.uint8).reshape(x.shape)
    return q, scale.squeeze(-1), zero.squeeze(-1)


def ref_layernorm_modulate_quantize_int8(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`layernorm_modulate_quantize_int8`: the unfused composition, in ``x``'s dtype."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    modulated = normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return ref_quantize_per_token_int8(modulated)


def ref_gelu_quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference of :func:`gelu_quantize_int8`: the unfused composition, in ``x``'s dtype."""
    return ref_quantize_per_token_int8(F.gelu(x, approximate="tanh"))


def ref_rmsnorm_modulate_quantize_int8(
    x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`rmsnorm_modulate_quantize_int8`: the unfused composition, in ``x``'s dtype
    (``ditq.models.layers.RMSNorm``'s math: the mean of squares in float32, the normalized value
    rounded to ``x``'s dtype before the weight multiplies it)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = weight * (x * torch.rsqrt(variance + eps)).to(x.dtype)
    modulated = normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return ref_quantize_per_token_int8(modulated)


def ref_swiglu_quantize_int8(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Reference of :func:`swiglu_quantize_int8`: the unfused composition, in the inputs' dtype."""
    return ref_quantize_per_token_int8(F.silu(gate) * up)


def ref_w8a8_linear(
    xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor, bias: Tensor | None = None, out_dtype=torch.float32
) -> Tensor:
    """Reference of :func:`w8a8_linear`."""
    k, n = xq.shape[-1], wq.shape[0]
    x2 = xq.reshape(-1, k)
    acc = _int_matmul(x2, wq)
    y = _epilogue(acc, _per_token(xs, x2.shape[0]), _per_out(ws, n), bias)
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


def ref_w158a8_linear(
    xq: Tensor,
    xs: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype=torch.float32,
) -> Tensor:
    """Reference of :func:`w158a8_linear`."""
    k, n = xq.shape[-1], w_packed.shape[0]
    x2 = xq.reshape(-1, k)
    w = unpack_2bit(w_packed, "k4").to(torch.int8) - 1  # codes w + 1 -> {-1, 0, +1}
    acc = _int_matmul(x2, w)
    y = _epilogue(acc, _per_token(xs, x2.shape[0]), _per_out(w_scale, n), bias)
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


def ref_w4a8_linear(
    xq: Tensor,
    xs: Tensor,
    x_zero: Tensor | None,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    bias: Tensor | None = None,
    out_dtype=torch.float32,
) -> Tensor:
    """Reference of :func:`w4a8_linear`."""
    k, n = xq.shape[-1], w_packed.shape[0]
    x2 = xq.reshape(-1, k).to(torch.int32)
    m = x2.shape[0]
    ga = k // (1 if tuple(xs.shape) == tuple(xq.shape[:-1]) else xs.shape[-1])  # activation group
    gw = k // w_scale.shape[1]  # weight group
    sx = xs.reshape(m, -1).float()
    zx = (
        x_zero.reshape(m, -1).to(torch.int32)
        if x_zero is not None
        else torch.zeros_like(sx, dtype=torch.int32)
    )
    qw = unpack_int4(w_packed).to(torch.int32)
    zw = w_zero.to(torch.int32)
    # Exact integer codes minus zero points (zero points are integers), then one exact integer
    # dot product per segment of L = gcd(ga, gw) inputs, where both scales are constant.
    a = x2 - zx.repeat_interleave(ga, dim=1)  # [M, K]
    b = qw - zw.repeat_interleave(gw, dim=1)  # [N, K]
    seg = math.gcd(ga, gw)
    y = torch.zeros(m, n, dtype=torch.float32, device=xq.device)
    for s in range(k // seg):
        lo = s * seg
        acc = _int_matmul(a[:, lo : lo + seg], b[:, lo : lo + seg])
        y += acc.float() * sx[:, lo // ga, None] * w_scale[None, :, lo // gw].float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


def ref_ternary_linear(x: Tensor, w_packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference of :func:`ternary_linear` (the numbers of :class:`ditq.quant.TernaryLinear`, bit for bit)."""
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1)
    w = s * (unpack_2bit(w_packed, "k4").to(s.dtype) - 1)  # [N, K] in the scale's dtype
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def ref_int4_linear(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, w_zero: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Reference of :func:`int4_linear` (the numbers of Q-DiT's dequantized weight)."""
    n, ng = w_scale.shape
    codes = unpack_int4(w_packed).reshape(n, ng, -1)
    w = ((codes.to(w_scale.dtype) - w_zero.unsqueeze(-1)) * w_scale.unsqueeze(-1)).reshape(n, -1)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


REFERENCE: dict[str, Callable] = {
    "quantize_per_token_int8": ref_quantize_per_token_int8,
    "quantize_per_token_asym": ref_quantize_per_token_asym,
    "layernorm_modulate_quantize_int8": ref_layernorm_modulate_quantize_int8,
    "gelu_quantize_int8": ref_gelu_quantize_int8,
    "rmsnorm_modulate_quantize_int8": ref_rmsnorm_modulate_quantize_int8,
    "swiglu_quantize_int8": ref_swiglu_quantize_int8,
    "w8a8_linear": ref_w8a8_linear,
    "w158a8_linear": ref_w158a8_linear,
    "w4a8_linear": ref_w4a8_linear,
    "ternary_linear": ref_ternary_linear,
    "int4_linear": ref_int4_linear,
}
"""Op name -> its plain-PyTorch reference implementation."""


# ----------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------


def _check_quantize(x: Tensor, group: int) -> int:
    op = "quantize_per_token_int8"
    k = _check_acts(op, x, "x", "float", max_k=False)
    if isinstance(group, bool) or not isinstance(group, int) or group < 0 or (group and k % group):
        _fail(op, f"group must be 0 (per token) or a size dividing K = {k}, got {group!r}")
    return k


@_op("quantize_per_token_int8")
def quantize_per_token_int8(x: Tensor, group: int = 0) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization per token (``group=0``) or per token and group of ``group`` inputs.

    ``x``: float ``[..., K]`` (any float dtype; computed in float32). Returns
    ``q`` int8 ``[..., K]`` and ``scale`` float32 ``[..., G]`` (G = 1 per token,
    else K / group), with ``x ≈ q * scale`` group by group. The rule is BitNet
    b1.58's: ``a = max(max|x|, 1e-5)``, ``q = clamp(round(x * (127 / a)), -128, 127)``,
    ``scale = a / 127``, where ``127 / a`` is computed as ``(1 / a) * 127`` (what
    ``127.0 / a`` does in PyTorch) and ``round`` is round-half-to-even (as
    ``torch.round``): the codes equal ``ditq.quant.ternary``'s activation fake
    quantization bit for bit. Codes stay in [-127, 127] (|x * 127 / a| <= 127).
    """
    _check_quantize(x, group)
    return _dispatch("quantize_per_token_int8", x.device, x, group)


@quantize_per_token_int8.register_fake
def _(x, group=0):
    k = _check_quantize(x, group)
    g = k if group == 0 else group
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], k // g), dtype=torch.float32)


def _check_quantize_asym(x: Tensor, bits: int, group: int) -> int:
    op = "quantize_per_token_asym"
    k = _check_acts(op, x, "x", "float", max_k=False)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        _fail(op, f"bits must be an integer in 2..8 (uint8 codes), got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 0 or (group and k % group):
        _fail(op, f"group must be 0 (per token) or a size dividing K = {k}, got {group!r}")
    return k


@_op("quantize_per_token_asym")
def quantize_per_token_asym(x: Tensor, bits: int, group: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max quantization to ``bits``-bit unsigned codes per token (``group=0``) or per
    token and group of ``group`` inputs: Q-DiT's dynamic activation quantizer.

    ``x``: float ``[..., K]`` (any float dtype; computed in float32). Returns
    ``q`` uint8 ``[..., K]``, ``scale`` and ``zero`` float32 ``[..., G]`` (G = 1
    per token, else K / group), with ``x ≈ (q - zero) * scale`` group by group.
    The rule is ``ditq.quant.primitives.quant_params`` / ``quantize`` with
    ``sym=False``: ``scale = max(max - min, 1e-5) / (2^bits - 1)``,
    ``zero = clamp(round(-min / scale), 0, 2^bits - 1)``,
    ``q = clamp(round(x / scale) + zero, 0, 2^bits - 1)``, with IEEE divisions
    and round-half-to-even (as ``torch.round``): for float32 ``x`` the codes,
    scales and zero points equal :class:`ditq.quant.ActQuantizer`'s bit for bit.
    Non-finite inputs give unspecified codes.
    """
    _check_quantize_asym(x, bits, group)
    return _dispatch("quantize_per_token_asym", x.device, x, bits, group)


@quantize_per_token_asym.register_fake
def _(x, bits, group=0):
    k = _check_quantize_asym(x, bits, group)
    g = k if group == 0 else group
    lead = (*x.shape[:-1], k // g)
    f32 = torch.float32
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(lead, dtype=f32), x.new_empty(lead, dtype=f32)


_PRODUCER_NOTE = """
    A fast implementation computes the producer in float32 with its own rounding
    (the order of a sum, a library's ``tanh``), so a value one unit in the last
    place away from the reference's can move its code by one where it lies at a
    rounding boundary: codes agree with the reference's except for such rare
    off-by-ones, the scales to float32 rounding. Rounding to ``x``'s dtype
    between steps is kept, so bfloat16 inputs give bfloat16 eager's numbers.
"""


def _check_layernorm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, op: str = "layernorm_modulate_quantize_int8"
) -> int:
    _check_tensor(op, "x", x, "float", dim=3)
    b, _, k = x.shape
    if k == 0:
        _fail(op, f"x must be [B, T, K] with K >= 1, got shape {tuple(x.shape)}")
    for name, t in (("shift", shift), ("scale", scale)):
        _check_tensor(op, name, t, (x.dtype,), dim=2)
        if tuple(t.shape) != (b, k):
            _fail(op, f"{name} must be [B, K] = [{b}, {k}] (one row per sample), got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        _fail(op, f"eps must be a positive finite number, got {eps!r}")
    return k


@_op("layernorm_modulate_quantize_int8")
def layernorm_modulate_quantize_int8(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """DiT's pre-linear activation in one pass: LayerNorm (no affine), adaLN modulation, int8 per token.

    ``x``: float ``[B, T, K]``; ``shift``, ``scale``: ``[B, K]`` in ``x``'s dtype
    (one row per sample, broadcast over its T tokens). Computes
    ``quantize_per_token_int8(layer_norm(x, eps) * (1 + scale) + shift)``: ``q``
    int8 ``[B, T, K]`` and ``scale`` float32 ``[B, T, 1]``, without writing the
    normalized or modulated activations (two thirds of the bytes such a block
    moves before its ``qkv`` and ``fc1`` linears on a GPU).
    """
    _check_layernorm_modulate(x, shift, scale, eps)
    return _dispatch("layernorm_modulate_quantize_int8", x.device, x, shift, scale, eps)


layernorm_modulate_quantize_int8.__doc__ += _PRODUCER_NOTE


@layernorm_modulate_quantize_int8.register_fake
def _(x, shift, scale, eps):
    _check_layernorm_modulate(x, shift, scale, eps)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _check_gelu_quantize(x: Tensor) -> int:
    return _check_acts("gelu_quantize_int8", x, "x", "float", max_k=False)


@_op("gelu_quantize_int8")
def gelu_quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """The MLP's hidden activation in one pass: GELU (tanh approximation), then int8 per token.

    ``x``: float ``[..., K]`` (the ``fc1`` output). Computes
    ``quantize_per_token_int8(gelu(x, approximate="tanh"))``: ``q`` int8
    ``[..., K]`` and ``scale`` float32 ``[..., 1]``, without writing the GELU
    output (the largest activation of a DiT block: 4x the hidden size).
    """
    _check_gelu_quantize(x)
    return _dispatch("gelu_quantize_int8", x.device, x)


gelu_quantize_int8.__doc__ += _PRODUCER_NOTE


@gelu_quantize_int8.register_fake
def _(x):
    _check_gelu_quantize(x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _check_rmsnorm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float) -> int:
    op = "rmsnorm_modulate_quantize_int8"
    k = _check_layernorm_modulate(x, shift, scale, eps, op)
    _check_tensor(op, "weight", weight, (x.dtype,), dim=1)
    if weight.shape[0] != k:
        _fail(op, f"weight must be [K] = [{k}], got {tuple(weight.shape)}")
    return k


@_op("rmsnorm_modulate_quantize_int8")
def rmsnorm_modulate_quantize_int8(
    x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Large-DiT's (TerDiT's) pre-linear activation in one pass: RMSNorm with its weight, adaLN
    modulation, int8 per token.

    ``x``: float ``[B, T, K]``; ``weight``: ``[K]``; ``shift``, ``scale``:
    ``[B, K]``; all in ``x``'s dtype. Computes
    ``quantize_per_token_int8(weight * x * rsqrt(mean(x², -1) + eps) * (1 + scale) + shift)``
    with :class:`ditq.models.layers.RMSNorm`'s roundings: ``q`` int8 ``[B, T, K]``
    and ``scale`` float32 ``[B, T, 1]``. One call feeds all the linears that read
    the block's normalized input (``wq``, ``wk``, ``wv``; ``w1``, ``w3``).
    """
    _check_rmsnorm_modulate(x, weight, shift, scale, eps)
    return _dispatch("rmsnorm_modulate_quantize_int8", x.device, x, weight, shift, scale, eps)


rmsnorm_modulate_quantize_int8.__doc__ += _PRODUCER_NOTE


@rmsnorm_modulate_quantize_int8.register_fake
def _(x, weight, shift, scale, eps):
    _check_rmsnorm_modulate(x, weight, shift, scale, eps)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _check_swiglu_quantize(gate: Tensor, up: Tensor) -> int:
    op = "swiglu_quantize_int8"
    k = _check_acts(op, gate, "gate", "float", max_k=False)
    _check_tensor(op, "up", up, (gate.dtype,))
    if up.shape != gate.shape:
        _fail(op, f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    return k


@_op("swiglu_quantize_int8")
def swiglu_quantize_int8(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """SwiGLU's hidden activation in one pass: ``silu(gate) * up``, then int8 per token.

    ``gate``, ``up``: float ``[..., K]``, same shape and dtype (the ``w1`` and
    ``w3`` outputs of a Large-DiT feed-forward). Computes
    ``quantize_per_token_int8(silu(gate) * up)``: ``q`` int8 ``[..., K]`` and
    ``scale`` float32 ``[..., 1]``, without writing the product (the input of ``w2``).
    """
    _check_swiglu_quantize(gate, up)
    return _dispatch("swiglu_quantize_int8", gate.device, gate, up)


swiglu_quantize_int8.__doc__ += _PRODUCER_NOTE


@swiglu_quantize_int8.register_fake
def _(gate, up):
    _check_swiglu_quantize(gate, up)
    scales = gate.new_empty((*gate.shape[:-1], 1), dtype=torch.float32)
    return gate.new_empty(gate.shape, dtype=torch.int8), scales


def _check_w8a8(xq, xs, wq, ws, bias, out_dtype) -> int:
    op = "w8a8_linear"
    k = _check_acts(op, xq, "xq", (torch.int8,))
    if _check_token_params(op, "xs", xs, xq) != 1:
        _fail(op, "xs must hold one scale per token ([..., 1]); per-group activations need w4a8_linear")
    _check_tensor(op, "wq", wq, (torch.int8,), dim=2)
    if wq.shape[1] != k:
        _fail(op, f"wq must be int8 [N, K] with K = {k} (the inputs' last axis), got {tuple(wq.shape)}")
    n = wq.shape[0]
    _check_out_scale(op, "ws", ws, n)
    _check_bias(op, bias, n)
    _check_out_dtype(op, out_dtype)
    return n


@_op("w8a8_linear")
def w8a8_linear(
    xq: Tensor,
    xs: Tensor,
    wq: Tensor,
    ws: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``y = (xq @ wq.T) * xs * ws + bias``: int8 x int8 with int32 accumulation, then a float32 epilogue.

    ``xq`` int8 ``[..., K]`` with ``xs`` float ``[..., 1]`` (one scale per token,
    e.g. from :func:`quantize_per_token_int8`); ``wq`` int8 ``[N, K]`` (symmetric
    codes) with ``ws`` float, 1 value (per tensor) or N (per output channel, any
    shape holding N such as ``[N]`` or ``[N, 1]``); ``bias`` float ``[N]`` or None.
    Returns ``out_dtype [..., N]``; the epilogue is ``float(acc) * xs * ws + bias``
    in float32, in that order.
    """
    _check_w8a8(xq, xs, wq, ws, bias, out_dtype)
    return _dispatch("w8a8_linear", xq.device, xq, xs, wq, ws, bias, out_dtype)


@w8a8_linear.register_fake
def _(xq, xs, wq, ws, bias=None, out_dtype=torch.float32):
    n = _check_w8a8(xq, xs, wq, ws, bias, out_dtype)
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


def _check_w158a8(xq, xs, w_packed, w_scale, bias, out_dtype) -> int:
    op = "w158a8_linear"
    k = _check_acts(op, xq, "xq", (torch.int8,))
    if _check_token_params(op, "xs", xs, xq) != 1:
        _fail(op, "xs must hold one scale per token ([..., 1])")
    n = _check_ternary_weight(op, w_packed, k)
    _check_out_scale(op, "w_scale", w_scale, n)
    _check_bias(op, bias, n)
    _check_out_dtype(op, out_dtype)
    return n


@_op("w158a8_linear")
def w158a8_linear(
    xq: Tensor,
    xs: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W1.58A8: ``y = (xq @ W̃.T) * xs * w_scale + bias`` with ternary ``W̃`` packed 2 bits per weight.

    ``xq`` int8 ``[..., K]``, ``xs`` float ``[..., 1]`` (per token); ``w_packed``
    uint8 ``[N, K/4]`` in the ``"k4"`` layout (codes ``W̃ + 1``; K a multiple of
    4); ``w_scale`` float, 1 value (TerDiT's α or BitNet's γ) or N (per output
    channel); ``bias`` float ``[N]`` or None. Returns ``out_dtype [..., N]``;
    exact int32 accumulation, then ``float(acc) * xs * w_scale + bias``.
    """
    _check_w158a8(xq, xs, w_packed, w_scale, bias, out_dtype)
    return _dispatch("w158a8_linear", xq.device, xq, xs, w_packed, w_scale, bias, out_dtype)


@w158a8_linear.register_fake
def _(xq, xs, w_packed, w_scale, bias=None, out_dtype=torch.float32):
    n = _check_w158a8(xq, xs, w_packed, w_scale, bias, out_dtype)
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


def _check_w4a8(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype) -> int:
    op = "w4a8_linear"
    k = _check_acts(op, xq, "xq", (torch.int8, torch.uint8))
    if (xq.dtype == torch.uint8) != (x_zero is not None):
        _fail(
            op,
            "activations are int8 codes without x_zero (symmetric) or uint8 codes with x_zero "
            f"(asymmetric); got {xq.dtype} with x_zero {'given' if x_zero is not None else 'None'}",
        )
    _check_token_params(op, "xs", xs, xq)
    if x_zero is not None:
        _check_token_params(op, "x_zero", x_zero, xq)
        if x_zero.shape != xs.shape:
            _fail(op, f"x_zero must have the shape of xs {tuple(xs.shape)}, got {tuple(x_zero.shape)}")
    n = _check_int4_weight(op, w_packed, k)
    _check_group_params(op, w_scale, w_zero, n, k)
    _check_bias(op, bias, n)
    _check_out_dtype(op, out_dtype)
    return n


@_op("w4a8_linear")
def w4a8_linear(
    xq: Tensor,
    xs: Tensor,
    x_zero: Tensor | None,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Q-DiT's group-wise W4A8 linear: ``y = Σ_k (q_w − z_w)·s_w · (q_x − z_x)·s_x + bias``.

    Weights: ``w_packed`` uint8 ``[N, K/2]``, int4 codes two per byte
    (:func:`ditq.kernels.packing.pack_int4` of :class:`ditq.quant.QuantLinear`'s
    ``qweight``), ``w_scale`` and ``w_zero`` float ``[N, K/gw]``: one (scale,
    integer zero point) per output row and group of ``gw`` inputs (symmetric
    4-bit codes are stored as ``q + 8`` with zero point 8).

    Activations: ``xq [..., K]`` with ``xs [..., K/ga]`` (one scale per token,
    or per token and group of ``ga`` inputs) and either int8 codes with
    ``x_zero=None`` (symmetric, e.g. :func:`quantize_per_token_int8`) or uint8
    codes with integer zero points ``x_zero`` shaped like ``xs`` (Q-DiT's
    asymmetric dynamic quantizer).

    Zero points are handled exactly: within each segment of ``gcd(ga, gw)``
    inputs both scales are constant, and the integer sum
    ``Σ (q_w − z_w)(q_x − z_x) = Σ q_w q_x − z_w Σ q_x − z_x Σ q_w + L z_w z_x``
    is exact in int32; segments are then scaled and summed in float32.
    Returns ``out_dtype [..., N]``.
    """
    _check_w4a8(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype)
    return _dispatch("w4a8_linear", xq.device, xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype)


@w4a8_linear.register_fake
def _(xq, xs, x_zero, w_packed, w_scale, w_zero, bias=None, out_dtype=torch.float32):
    n = _check_w4a8(xq, xs, x_zero, w_packed, w_scale, w_zero, bias, out_dtype)
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


def _check_ternary(x, w_packed, scale, bias) -> int:
    op = "ternary_linear"
    k = _check_acts(op, x, "x", "float", max_k=False)
    n = _check_ternary_weight(op, w_packed, k)
    _check_out_scale(op, "scale", scale, n)
    _check_bias(op, bias, n)
    return n


@_op("ternary_linear")
def ternary_linear(x: Tensor, w_packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Weight-only ternary linear: ``y = x @ (scale · W̃).T + bias`` with float activations.

    ``x`` float ``[..., K]``; ``w_packed`` uint8 ``[N, K/4]`` ("k4", codes
    ``W̃ + 1``); ``scale`` float, 1 value or N (per output channel); ``bias``
    ``[N]`` or None. The weight ``scale · W̃`` is formed in the scale's dtype and
    cast to ``x.dtype``; returns ``x.dtype [..., N]`` — the numbers of
    :class:`ditq.quant.TernaryLinear` with ``act_bits=None``. For small batches,
    where reading the weights dominates.
    """
    _check_ternary(x, w_packed, scale, bias)
    return _dispatch("ternary_linear", x.device, x, w_packed, scale, bias)


@ternary_linear.register_fake
def _(x, w_packed, scale, bias=None):
    n = _check_ternary(x, w_packed, scale, bias)
    return x.new_empty((*x.shape[:-1], n))


def _check_int4(x, w_packed, w_scale, w_zero, bias) -> int:
    op = "int4_linear"
    k = _check_acts(op, x, "x", "float", max_k=False)
    n = _check_int4_weight(op, w_packed, k)
    _check_group_params(op, w_scale, w_zero, n, k)
    _check_bias(op, bias, n)
    return n


@_op("int4_linear")
def int4_linear(
    x: Tensor, w_packed: Tensor, w_scale: Tensor, w_zero: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Weight-only group-wise int4 linear: ``y = x @ ((q − z) · s).T + bias`` with float activations.

    ``x`` float ``[..., K]``; ``w_packed`` uint8 ``[N, K/2]`` (int4, two per
    byte); ``w_scale``, ``w_zero`` float ``[N, K/g]`` (the group size g is
    ``K / w_scale.shape[1]``). The weight is dequantized in the scale's dtype
    (as :func:`ditq.quant.primitives.dequantize`) and cast to ``x.dtype``;
    returns ``x.dtype [..., N]``. For small batches. Zero points are integers
    (Q-DiT rounds them): the fast implementations rely on ``q − z`` being exact.
    """
    _check_int4(x, w_packed, w_scale, w_zero, bias)
    return _dispatch("int4_linear", x.device, x, w_packed, w_scale, w_zero, bias)


@int4_linear.register_fake
def _(x, w_packed, w_scale, w_zero, bias=None):
    n = _check_int4(x, w_packed, w_scale, w_zero, bias)
    return x.new_empty((*x.shape[:-1], n))
