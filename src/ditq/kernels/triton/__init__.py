"""Triton kernels of the ditq ops for NVIDIA (and AMD) GPUs, registered as their "cuda" implementations.

One kernel family per kind of op, each checked against the op's reference in
:mod:`ditq.kernels.reference` (``tests/kernels/test_triton.py``):

* ``quantize_per_token_int8`` -- one program per block of rows (a row is a
  token, or one of its groups). A row of up to 8192 inputs is loaded once and
  kept in registers (max |x|, then the codes); longer rows are read twice. The
  numbers are the reference's bit for bit: IEEE-rounded divisions
  (``div_rn``) and round-half-to-even (``rint``).
* ``layernorm_modulate_quantize_int8``, ``gelu_quantize_int8``,
  ``rmsnorm_modulate_quantize_int8``, ``swiglu_quantize_int8`` -- the same row
  programs with the producer in front: DiT's LayerNorm (float32 mean, then
  variance of the deviations; ``rstd`` with IEEE ``sqrt_rn`` and ``div_rn``) and
  adaLN modulation, PyTorch's tanh GELU (its order and FMA; libdevice's
  ``tanh``), Large-DiT's RMSNorm (float32 mean of squares, IEEE ``rsqrt``; its
  weight) and adaLN modulation, or SwiGLU's ``silu(gate) * up`` (PyTorch's
  ``x / (1 + exp(-x))``, libdevice's ``exp``), each step rounded to the input's
  dtype as eager does, then the quantizer's rule. Longer rows are read four
  times (LayerNorm), three times (RMSNorm) or twice (GELU, SwiGLU). Codes within
  one of the reference's, rarely (at rounding boundaries); scales to float32
  rounding. float16, bfloat16, float32 (float64 declined).
* ``w8a8_linear``, ``w158a8_linear`` -- a blocked GEMM over (M, N, K) tiles,
  programs ordered in groups of row tiles for L2 reuse, int8 x int8 ``tl.dot``
  into an exact int32 accumulator. Ternary weights are read as their packed
  "k4" bytes (a contiguous ``[BLOCK_N, BLOCK_K/4]`` tile, a quarter of the
  int8 bytes) and unpacked in registers: shift, mask, minus one, then
  interleaved back into K order. The epilogue is fused:
  ``float(acc) * x_scale[m] * w_scale[n] + bias[n]`` in float32, in the
  reference's order and with FMA fusion off, cast to the output dtype at the store.
* ``w4a8_linear`` -- the same GEMM with int4 weights (two per byte, unpacked by
  nibble) and Q-DiT's group-wise scales and integer zero points. Zero points are
  exact: the int32 sum of each constant-scale segment (``gcd`` of the two group
  sizes) is expanded into an int8 dot product plus row and column sums, then
  scaled to float32 and added once per segment. Needs that segment to be a
  multiple of 32 inputs (else the reference runs).
* ``ternary_linear``, ``int4_linear`` -- weight-only, for small batches where
  reading the weights dominates: packed weights are unpacked (and, for int4,
  dequantized with per-element gathered group scales, any group size) in
  registers and multiplied with float ``tl.dot`` into float32. float32
  activations use IEEE products unless PyTorch allows TF32
  (``torch.backends.cuda.matmul.allow_tf32``), as ``F.linear`` does.

All kernels mask partial tiles, so any M, N and K work. GEMM tile shapes are
autotuned per (power-of-two bucket of M, N, K) among configs aimed at DiT
layers (K = 1152 with N = 1152 / 3456 / 4608, K = 4608 with N = 1152, M from 1
to 8192); under Triton's interpreter each kernel has one small config. A call
the kernels do not handle returns ``NotImplemented`` and the reference runs.

Use: importing this package (``ditq.kernels.dispatch`` does it on the first op call)
registers the kernels when :func:`available`; importing it never fails, with
or without Triton, and compiles nothing (kernels compile on first call, per
shape class). Requires Triton >= 3.0.

The interpreter (``TRITON_INTERPRET=1`` in the environment *before* Triton is
imported, as Triton reads it when decorating kernels, its own included) runs
the kernels on CPU tensors; that is how they are tested without a GPU.
:mod:`ditq.kernels.triton.aot` compiles them for a GPU without one (``sm_90`` by
default) and reads what they compiled to: shared memory, registers, spills, the
tensor-core instruction, pipelining (``benchmarks/triton_compile.py``).
"""

from __future__ import annotations

import os

import torch

from ditq.kernels import dispatch

__all__ = ["available", "interpreting", "register", "unregister", *dispatch.OPS]

MIN_TRITON_MAJOR = 3
"""Oldest Triton major version the kernels are written for (tl.interleave, libdevice, input_precision)."""

_unavailable_reason: str | None = None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's interpreter (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_importable() -> bool:
    global _unavailable_reason
    try:
        # Absolute import: the real Triton, never this package (ditq.kernels.triton).
        import triton
    except Exception as exc:  # ImportError, or a broken install failing at import
        _unavailable_reason = f"triton is not importable ({type(exc).__name__}: {exc})"
        return False
    version = getattr(triton, "__version__", "0")
    if int(version.split(".")[0]) < MIN_TRITON_MAJOR:
        _unavailable_reason = f"triton {version} is too old (the kernels need triton >= {MIN_TRITON_MAJOR}.0)"
        return False
    return True


def available() -> bool:
    """True when the Triton kernels can run: Triton imports and a CUDA device is present, or interpreter mode.

    Without a GPU and without ``TRITON_INTERPRET=1`` this does not import Triton.
    """
    global _unavailable_reason
    if not (interpreting() or torch.cuda.is_available()):
        _unavailable_reason = "no CUDA device (and TRITON_INTERPRET is not set)"
        return False
    return _triton_importable()


def unavailable_reason() -> str | None:
    """Why :func:`available` last returned False (None when it has not)."""
    return _unavailable_reason


def register() -> bool:
    """Make the Triton kernels the "cuda" implementations of every ditq op; False if not :func:`available`."""
    if not available():
        return False
    from ditq.kernels.triton import launch

    for name in dispatch.OPS:
        dispatch.register_impl(name, "cuda", getattr(launch, name))
    return True


def unregister() -> None:
    """Remove the Triton kernels from the "cuda" implementations (those registered by :func:`register`)."""
    import sys

    launch = sys.modules.get("ditq.kernels.triton.launch")
    if launch is None:
        return
    for name in dispatch.OPS:
        if dispatch.registered_impl(name, "cuda") is getattr(launch, name):
            dispatch.register_impl(name, "cuda", None)


def __getattr__(name: str):
    """``ditq.kernels.triton.<op>``: the op's Triton implementation (imports Triton on first use)."""
    if name in dispatch.OPS:
        from ditq.kernels.triton import launch

        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()
