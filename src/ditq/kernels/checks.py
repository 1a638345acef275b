"""The error the kernels raise, and the argument checks the ops run before any implementation.

Checks look at shapes and dtypes only, never at values: they run on fake and meta tensors
too, so a call that ``torch.compile`` or ``torch.export`` traces fails the same way as an
eager one. Every failure is one :class:`KernelError` line that starts with the op's name
and says what was wrong, which the CLI prints as such.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ditq.errors import DitqError

MAX_K = 65536
"""Most inputs an integer op takes: |int8 x int8| <= 2^14 per product, so int32 sums fit up to 2^17."""


class KernelError(DitqError, ValueError):
    """Arguments an op cannot take (wrong dtype, shape or layout), or a backend or instruction set
    this machine lacks: a one-line message, which the CLI prints as such."""


def fail(op: str, msg: str):
    """Raise the one-line :class:`KernelError` ``"<op>: <msg>"``."""
    raise KernelError(f"{op}: {msg}")


def check_tensor(op: str, name: str, t, dtypes=None, dim: int | None = None) -> None:
    """``t`` is a tensor of one of ``dtypes`` (a tuple, ``"float"`` for any floating-point dtype, or None:
    any) with ``dim`` axes (None: any number)."""
    if not isinstance(t, Tensor):
        fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if dtypes == "float":
        if not t.is_floating_point():
            fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")
    elif dtypes is not None and t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        fail(op, f"{name} must be {want}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        fail(op, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_acts(op: str, x: Tensor, name: str, dtypes, max_k: bool = True) -> int:
    """K of activations ``x [..., K]``."""
    check_tensor(op, name, x, dtypes)
    if x.dim() == 0 or x.shape[-1] == 0:
        fail(op, f"{name} must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if max_k and k > MAX_K:
        fail(op, f"K = {k} exceeds {MAX_K} (int32 accumulation); split the layer's inputs")
    return k


def check_token_params(op: str, name: str, p: Tensor, x: Tensor) -> int:
    """Number of groups G of per-token parameters ``p [..., G]`` for activations ``x [..., K]``."""
    check_tensor(op, name, p, "float")
    lead = tuple(x.shape[:-1])
    if tuple(p.shape) == lead:  # one per token, without the group axis
        return 1
    if p.dim() != x.dim() or tuple(p.shape[:-1]) != lead or p.shape[-1] == 0 or x.shape[-1] % p.shape[-1]:
        fail(
            op,
            f"{name} must be [..., G] with the leading shape {lead} of the activations and G dividing "
            f"K = {x.shape[-1]}, got {tuple(p.shape)}",
        )
    return p.shape[-1]


def check_out_scale(op: str, name: str, s: Tensor, n: int) -> None:
    """A per-tensor (1 element) or per-output-channel (N elements) scale."""
    check_tensor(op, name, s, "float")
    if s.numel() not in (1, n):
        fail(
            op, f"{name} must hold 1 value (per tensor) or N = {n} (per output channel), got {tuple(s.shape)}"
        )


def check_bias(op: str, bias: Tensor | None, n: int) -> None:
    """``bias`` is None or a float ``[N]``."""
    if bias is not None:
        check_tensor(op, "bias", bias, "float")
        if tuple(bias.shape) != (n,):
            fail(op, f"bias must be [N] = [{n}], got {tuple(bias.shape)}")


def check_out_dtype(op: str, out_dtype) -> None:
    """``out_dtype`` is a floating-point ``torch.dtype``."""
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        fail(op, f"out_dtype must be a floating-point dtype, got {out_dtype}")


def check_group_params(op: str, scale: Tensor, zero: Tensor, n: int, k: int) -> int:
    """Group size of weight parameters ``[N, K/g]`` (Q-DiT's ``w_scale``/``w_zero``)."""
    check_tensor(op, "w_scale", scale, "float", dim=2)
    check_tensor(op, "w_zero", zero, "float", dim=2)
    if scale.shape != zero.shape or scale.shape[0] != n or scale.shape[1] == 0 or k % scale.shape[1]:
        fail(
            op,
            f"w_scale and w_zero must both be [N, K/g] = [{n}, K/g] with g dividing K = {k}, got "
            f"{tuple(scale.shape)} and {tuple(zero.shape)}",
        )
    return k // scale.shape[1]


def check_int4_weight(op: str, w_packed: Tensor, k: int) -> int:
    """N of int4 weights packed two per byte: uint8 ``[N, K/2]``."""
    check_tensor(op, "w_packed", w_packed, (torch.uint8,), dim=2)
    if k % 2 or w_packed.shape[1] * 2 != k:
        fail(
            op,
            f"w_packed must be uint8 [N, K/2] (int4, two per byte) for K = {k}, got {tuple(w_packed.shape)}",
        )
    return w_packed.shape[0]


def check_ternary_weight(op: str, w_packed: Tensor, k: int) -> int:
    """N of ternary weights packed "k4": uint8 ``[N, K/4]``."""
    check_tensor(op, "w_packed", w_packed, (torch.uint8,), dim=2)
    if k % 4 or w_packed.shape[1] * 4 != k:
        fail(
            op,
            f"w_packed must be uint8 [N, K/4] (ternary, 'k4' layout) for K = {k}; K must be a multiple "
            f"of 4, got {tuple(w_packed.shape)}",
        )
    return w_packed.shape[0]
