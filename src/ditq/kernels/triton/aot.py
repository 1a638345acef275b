"""Compile the Triton kernels for a GPU this machine does not have, and read what they compiled to.

A call of an op function of :mod:`ditq.kernels.triton.launch` on ``meta`` tensors,
inside :func:`~ditq.kernels.triton.launch.recording`, yields the launches a real
call would make (same arguments, dtypes and launch options). Each is compiled
here ahead of time for an NVIDIA target (``sm_90`` for H100/H200 by default),
once per autotuning config that survives the kernel's own pruning, specializing
the arguments exactly as Triton's runtime does (16-byte alignment of pointers
and of integers, integers equal to 1 as constants). Triton ships ``ptxas`` and
``cuobjdump``, so no GPU and no CUDA installation are needed.

What comes back per compiled variant (:class:`CompiledVariant`): shared memory,
registers per thread, stack bytes (register spills), which tensor-core
instruction the dot products became (``wgmma`` on Hopper, ``mma.sync`` before,
``none``), whether the K loop's loads were software-pipelined (asynchronous
copies into shared memory), how many float32 FMAs the code holds (kernels that
must round as the reference does are launched with FMA fusion off), and the
number of programs the grid launches. These
are the static facts behind a kernel's speed: they say whether a kernel *can*
reach the hardware's ceiling, not how fast it runs.

Use::

    from ditq.kernels.triton import aot
    rows = aot.compile_op("w158a8_linear", xq, xs, w_packed, w_scale, None, torch.bfloat16)

with ``meta`` tensors of the real shapes (``aot.meta_args`` builds them for an op
and a shape); ``scripts/triton_compile_report.py`` runs the benchmark shapes.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource, make_backend

from ditq.kernels import dispatch
from ditq.kernels.triton import launch

try:  # Triton's C++ specialization: exactly the runtime's rules
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - older Triton
    native_specialize_impl = None

HOPPER = 90
"""Compute capability of H100/H200 (compiled as ``sm_90a``, where ``wgmma`` exists)."""


@dataclasses.dataclass
class CompiledVariant:
    """One kernel compiled with one autotuning config for one launch (see the module docstring)."""

    kernel: str
    config: dict
    programs: int
    shared_bytes: int | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    mma: str | None = None
    pipelined_loads: int | None = None
    fma_f32: int | None = None
    compile_s: float | None = None
    error: str | None = None

    @property
    def spills(self) -> bool:
        """Whether registers spilled to the stack (local memory traffic in the kernel's loops)."""
        return bool(self.stack_bytes)


def available() -> bool:
    """Whether this Triton can compile for NVIDIA targets here (its wheel ships the backend and ptxas)."""
    if native_specialize_impl is None:
        return False
    try:
        make_backend(GPUTarget("cuda", HOPPER, 32))
        native_specialize_impl(BaseBackend, 16, False, True, True)  # the signature this module calls
    except Exception:  # noqa: BLE001 - a missing backend or a changed internal raises differently
        return False
    return Path(triton.knobs.nvidia.ptxas.path).exists()


def meta_args(op: str, m: int, k: int, n: int, dtype: torch.dtype = torch.bfloat16, group: int = 128):
    """Arguments of ``launch.<op>`` for ``x [m, k] @ W[n, k].T`` as ``meta`` tensors (bias included).

    ``dtype`` is the activations' (weight-only ops) or the output's (integer
    GEMMs); ``group`` the Q-DiT group size of W4A8 (both sides) and of int4
    weights; ``quantize_per_token_int8`` and ``quantize_per_token_asym`` quantize
    ``x [m, k]`` per token (``group`` is ignored there). The fused producers take
    ``x`` in ``dtype``: ``gelu_quantize_int8`` as ``[m, k]``, ``swiglu_quantize_int8``
    as gate and up ``[m, k]``; ``layernorm_modulate_quantize_int8`` and
    ``rmsnorm_modulate_quantize_int8`` as ``[m / 256, 256, k]`` (256 tokens per
    image, DiT-XL/2's and TerDiT's; ``[1, m, k]`` when 256 does not divide m),
    with eps 1e-6 (DiT's LayerNorm) and 1e-5 (Large-DiT's RMSNorm).
    """

    def t(*shape, dt=torch.float32):
        return torch.empty(shape, dtype=dt, device="meta")

    bias = t(n)
    if op == "quantize_per_token_int8":
        return (t(m, k, dt=dtype), 0)
    if op == "quantize_per_token_asym":
        return (t(m, k, dt=dtype), 8, 0)
    b, tokens = (m // 256, 256) if m % 256 == 0 else (1, m)
    if op == "layernorm_modulate_quantize_int8":
        return (t(b, tokens, k, dt=dtype), t(b, k, dt=dtype), t(b, k, dt=dtype), 1e-6)
    if op == "rmsnorm_modulate_quantize_int8":
        return (t(b, tokens, k, dt=dtype), t(k, dt=dtype), t(b, k, dt=dtype), t(b, k, dt=dtype), 1e-5)
    if op == "gelu_quantize_int8":
        return (t(m, k, dt=dtype),)
    if op == "swiglu_quantize_int8":
        return (t(m, k, dt=dtype), t(m, k, dt=dtype))
    if op == "w8a8_linear":
        return (t(m, k, dt=torch.int8), t(m, 1), t(n, k, dt=torch.int8), t(n, 1), bias, dtype)
    if op == "w158a8_linear":
        return (t(m, k, dt=torch.int8), t(m, 1), t(n, k // 4, dt=torch.uint8), t(1), bias, dtype)
    if op == "w4a8_linear":
        groups = k // group
        xs, xz = t(m, groups), t(m, groups)
        return (
            t(m, k, dt=torch.uint8),
            xs,
            xz,
            t(n, k // 2, dt=torch.uint8),
            t(n, groups),
            t(n, groups),
            bias,
            dtype,
        )
    if op == "ternary_linear":
        return (t(m, k, dt=dtype), t(n, k // 4, dt=torch.uint8), t(1), bias)
    if op == "int4_linear":
        groups = k // group
        return (t(m, k, dt=dtype), t(n, k // 2, dt=torch.uint8), t(n, groups), t(n, groups), bias)
    raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")


OPS = dispatch.OPS
"""The ops with Triton kernels: every ditq op (each a :mod:`ditq.kernels.triton.launch` function)."""


def record(op: str, *args) -> list[launch.Launch]:
    """The launches ``launch.<op>(*args)`` makes (``meta`` tensors in, nothing run)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")
    with launch.recording() as launches:
        result = getattr(launch, op)(*args)
    if result is NotImplemented:
        raise ValueError(f"the Triton kernels decline this {op} call (the reference would run)")
    return list(launches)


def compile_op(op: str, *args, arch: int = HOPPER) -> list[CompiledVariant]:
    """Compile every launch of ``launch.<op>(*args)`` for ``sm_<arch>``, once per surviving config."""
    return [v for rec in record(op, *args) for v in compile_launch(rec, arch=arch)]


def jit_function(rec: launch.Launch):
    """The ``@triton.jit`` function a recorded launch runs (unwrapping its autotuner)."""
    return rec.kernel.fn if isinstance(rec.kernel, triton.runtime.Autotuner) else rec.kernel


def kernel_arguments(rec: launch.Launch) -> dict:
    """The launch's kernel arguments by name (positional, then keywords; not the launch options)."""
    jit_fn = jit_function(rec)
    named = dict(zip(jit_fn.arg_names, rec.args, strict=False))
    named.update({k: v for k, v in rec.kwargs.items() if k in jit_fn.arg_names})
    return named


def compile_launch(rec: launch.Launch, arch: int = HOPPER) -> list[CompiledVariant]:
    """Compile one recorded launch for ``sm_<arch>``: each config its autotuner would time, else the one."""
    kernel = rec.kernel
    tuned = isinstance(kernel, triton.runtime.Autotuner)
    jit_fn = jit_function(rec)
    options = {k: v for k, v in rec.kwargs.items() if k not in jit_fn.arg_names}
    named = kernel_arguments(rec)
    if tuned:
        # As Autotuner.run: positional arguments in nargs, the call's keywords to the prune hook.
        kernel.nargs = dict(zip(jit_fn.arg_names, rec.args, strict=False))
        try:
            configs = kernel.prune_configs(rec.kwargs)
        finally:
            kernel.nargs = None
        variants = [({**c.kwargs}, {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in configs]
    else:
        variants = [({}, {})]
    out = []
    for meta, tuning in variants:
        opts = {**options, **tuning}
        params = {**named, **meta}
        grid = rec.grid(params) if callable(rec.grid) else rec.grid
        programs = 1
        for g in grid:
            programs *= int(g)
        label = {**meta, **{k: opts[k] for k in ("num_warps", "num_stages") if k in opts}}
        variant = CompiledVariant(kernel=jit_fn.__name__, config=label, programs=programs)
        try:
            _compile_into(variant, jit_fn, params, opts, arch)
        except Exception as e:  # noqa: BLE001 - a compile error is a result to report, not a crash
            lines = str(e).strip().splitlines()
            variant.error = f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"
        out.append(variant)
    return out


def _source(jit_fn, params: dict, target: GPUTarget) -> ASTSource:
    """The ASTSource Triton's runtime would build for these argument values (its specialization rules)."""
    backend = make_backend(target)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(jit_fn.params):
        value = params[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        specialize = not p.do_not_specialize
        kind, spec = native_specialize_impl(BaseBackend, value, False, specialize, specialize)
        if kind == "constexpr":  # an integer 1, or None: baked in as the runtime does
            signature[p.name] = "constexpr"
            constexprs[(i,)] = spec
            continue
        signature[p.name] = kind
        if isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    return ASTSource(jit_fn, signature, constexprs=constexprs, attrs=attrs)


def _compile_into(variant: CompiledVariant, jit_fn, params: dict, options: dict, arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    src = _source(jit_fn, params, target)
    start = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options)
    variant.compile_s = round(time.perf_counter() - start, 2)
    variant.shared_bytes = int(compiled.metadata.shared)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    if "wgmma.mma_async" in ptx:
        variant.mma = "wgmma"
    elif "mma.sync" in ptx:
        variant.mma = "mma.sync"
    else:
        variant.mma = "none"
    variant.fma_f32 = len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx))
    variant.pipelined_loads = ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy")
    usage = resource_usage(compiled.asm["cubin"])
    variant.registers = usage.get("REG")
    variant.stack_bytes = usage.get("STACK")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and static shared memory of a cubin's kernel, read by Triton's own ``cuobjdump``
    (``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}``; empty when the tool is missing)."""
    tool = Path(triton.knobs.nvidia.cuobjdump.path)
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM resources that bound how many programs (CTAs) of a kernel run at once."""

    sms: int
    registers: int = 65536
    threads: int = 2048
    ctas: int = 32
    shared_bytes: int = 233472  # 228 KiB per SM on sm_80/sm_90
    shared_per_cta_reserved: int = 1024  # the driver keeps 1 KiB per CTA


H200 = SmLimits(sms=132)
"""NVIDIA H200 (and H100 SXM): 132 SMs of compute capability 9.0."""


def ctas_per_sm(variant: CompiledVariant, limits: SmLimits = H200) -> int | None:
    """Programs of ``variant`` one SM holds at once (registers, threads, shared memory), None if unknown.

    Registers are allocated per warp in units of 256, as CUDA's occupancy calculator does.
    """
    warps = variant.config.get("num_warps", 4)
    if variant.registers is None or variant.shared_bytes is None:
        return None
    regs_per_warp = -(-variant.registers * 32 // 256) * 256
    by_regs = limits.registers // (regs_per_warp * warps)
    by_threads = limits.threads // (warps * 32)
    by_shared = limits.shared_bytes // (variant.shared_bytes + limits.shared_per_cta_reserved)
    return min(limits.ctas, by_regs, by_threads, by_shared)


def waves(variant: CompiledVariant, limits: SmLimits = H200) -> float | None:
    """The grid's programs over what the whole GPU holds at once: below 1 leaves SMs idle."""
    per_sm = ctas_per_sm(variant, limits)
    if not per_sm:
        return None
    return variant.programs / (per_sm * limits.sms)
