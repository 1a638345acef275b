"""Uniform integer quantization as pure functions: parameters, integer codes, and back.

``quant_params`` picks (scale, zero) for a tensor, ``quantize`` maps it to
integer codes, ``dequantize`` maps codes back, and ``fake_quantize`` is exactly
``dequantize(quantize(x))`` (what a simulated-quantization forward sees; the
real quantized linear stores the codes). The numbers are **bit for bit** those
of the Q-DiT quantizer (Juanerx/Q-DiT ``qdit/quant.py``, specified in
``shared/fixtures/qdit_quantizer_ref.md``) in float32 and float16:

* asymmetric (Q-DiT's default): codes ``[0, 2^b - 1]`` (uint8),
  ``scale = max(max - min, 1e-5) / (2^b - 1)``, ``zero = clamp(round(-min / scale), 0, 2^b - 1)``;
* symmetric: codes ``[-2^(b-1), 2^(b-1) - 1]`` (int8), ``scale = max(absmax, 1e-5) / (2^(b-1) - 1)``, zero 0;
* ``code = clamp(round(x / scale) + zero, q_min, q_max)``, ``x̂ = (code - zero) * scale``.

Bit-exactness needs Q-DiT's operation order: a real division by the scale (not
a multiplication by its reciprocal), ``torch.round`` (half to even), the zero
point rounded *then* clamped, every step in the input's dtype. Keep it.

``gptq_quant_params`` is GPTQ's own range rule (``qdit/gptq.py``
``Quantizer_GPTQ.find_params``), used inside GPTQ and in Q-DiT's ``--use_gptq``.

Groups follow :mod:`ditq.quant.granularity`: along the last axis, parameters
shaped like the tensor with the last axis replaced by the number of groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditq.errors import InvalidArgumentError
from ditq.quant.granularity import Granularity, check_bits, group_length, parse_granularity

# Q-DiT's floor on ranges: keeps the scale of an all-zero group finite.
RANGE_EPS = 1e-5


# ----------------------------------------------------------------------------
# Clipping (how the range is chosen)
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MinMax:
    """The group's min/max (absmax when symmetric), times ``ratio`` (Q-DiT ``clip_ratio``)."""

    ratio: float = 1.0

    def __post_init__(self) -> None:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise InvalidArgumentError(f"MinMax clip ratio must be in (0, 1], got {self.ratio!r}")


@dataclass(frozen=True)
class MSE:
    """Q-DiT's range search: scale the range by ``1 - shrink*i`` (i < steps), keep the lowest mean |err|^p."""

    p: float = 2.4
    steps: int = 100
    shrink: float = 0.001

    def __post_init__(self) -> None:
        if not isinstance(self.p, (int, float)) or isinstance(self.p, bool) or not self.p > 0:
            raise InvalidArgumentError(f"MSE clip norm p must be > 0, got {self.p!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidArgumentError(f"MSE clip steps must be an integer >= 1, got {self.steps!r}")
        ok = isinstance(self.shrink, (int, float)) and not isinstance(self.shrink, bool)
        if not ok or not 0 < self.shrink or self.shrink * (self.steps - 1) >= 1:
            raise InvalidArgumentError(
                f"MSE clip shrink must be > 0 with shrink*(steps-1) < 1, got shrink={self.shrink!r}, "
                f"steps={self.steps}"
            )


@dataclass(frozen=True)
class Percentile:
    """ditq's addition: the group's ``percentile``-th (and ``100 - percentile``-th) value, nearest rank."""

    percentile: float = 99.99

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50 < p <= 100:
            raise InvalidArgumentError(f"percentile must be in (50, 100], got {p!r}")


Clip = MinMax | MSE | Percentile


def as_clip(clip: Clip | str | float) -> Clip:
    """``"max"``/``"minmax"``, ``"mse"``, ``"percentile"``, a ratio in (0, 1], or a clip object."""
    if isinstance(clip, (MinMax, MSE, Percentile)):
        return clip
    if isinstance(clip, str):
        named = {"max": MinMax, "minmax": MinMax, "mse": MSE, "percentile": Percentile}
        if clip in named:
            return named[clip]()
        raise InvalidArgumentError(
            f"unknown clip {clip!r}; use 'max', 'mse', 'percentile' or a ratio in (0, 1]"
        )
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        return MinMax(float(clip))
    raise InvalidArgumentError(
        f"clip must be 'max', 'mse', 'percentile', a ratio in (0, 1] or MinMax/MSE/Percentile, got {clip!r}"
    )


# ----------------------------------------------------------------------------
# Integer grid
# ----------------------------------------------------------------------------


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    """Code range: ``[-2^(b-1), 2^(b-1) - 1]`` symmetric, ``[0, 2^b - 1]`` asymmetric."""
    check_bits(bits)
    if sym:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def code_dtype(sym: bool) -> torch.dtype:
    """int8 for symmetric codes, uint8 for asymmetric ones (bits <= 8 always fit)."""
    return torch.int8 if sym else torch.uint8


# ----------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------


def check_tensor(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidArgumentError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise InvalidArgumentError(
            f"{name} must have at least one axis and one element, got shape {tuple(x.shape)}"
        )


def require_finite(x: torch.Tensor, name: str = "x") -> None:
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgumentError(f"{name} holds NaN or infinite values; quantization needs finite inputs")


def _rows(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as ``[num_groups, group_len]`` (one group per row) and the shape of its parameters."""
    channels = x.shape[-1]
    g = group_length(parse_granularity(granularity), channels)
    if g is None:
        return x.reshape(1, -1), (1,) * x.dim()
    return x.reshape(-1, g), (*x.shape[:-1], channels // g)


def _grouped(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, what: str = "x"):
    """``x`` as ``[..., n_groups, g]`` and the parameters as ``[..., n_groups, 1]`` (checked)."""
    if not isinstance(scale, torch.Tensor) or not isinstance(zero, torch.Tensor):
        raise InvalidArgumentError("scale and zero must be tensors (as returned by quant_params)")
    if scale.shape != zero.shape or scale.dim() != x.dim():
        raise InvalidArgumentError(
            f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} must have one shape with the "
            f"{x.dim()} axes of {what} {tuple(x.shape)}"
        )
    n, channels = scale.shape[-1], x.shape[-1]
    lead_ok = all(s in (1, d) for s, d in zip(scale.shape[:-1], x.shape[:-1], strict=True))
    if n == 0 or channels % n or not lead_ok:
        raise InvalidArgumentError(
            f"scale shape {tuple(scale.shape)} does not fit {what} shape {tuple(x.shape)}: the last axis "
            f"must count groups dividing {channels}, the others be 1 or match"
        )
    xg = x.reshape(*x.shape[:-1], n, channels // n)
    return xg, scale.unsqueeze(-1), zero.unsqueeze(-1)


# ----------------------------------------------------------------------------
# Parameters (Q-DiT's rule)
# ----------------------------------------------------------------------------


def _sym_scale(absmax: torch.Tensor, q_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = absmax / q_max
    return scale, torch.zeros_like(scale)


def _asym_scale(lo: torch.Tensor, hi: torch.Tensor, q_min: int, q_max: int):
    scale = (hi - lo).clamp(min=RANGE_EPS) / q_max
    zero = torch.round(-lo / scale).clamp_(min=q_min, max=q_max)  # rounded, then clamped
    return scale, zero


def _fake_rows(rows, scale, zero, q_min: int, q_max: int) -> torch.Tensor:
    return (torch.clamp(torch.round(rows / scale) + zero, q_min, q_max) - zero) * scale


def _mse_params(rows: torch.Tensor, clip: MSE, sym: bool, q_min: int, q_max: int):
    """Q-DiT's ``quant_method='mse'``: strict-improvement search over shrunk ranges, per row."""
    w_max = rows.amax(dim=-1, keepdim=True)
    w_min = rows.amin(dim=-1, keepdim=True)
    w_absmax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=RANGE_EPS)
    best_score = torch.zeros_like(w_max) + 1e10
    best_min, best_max, best_absmax = w_min.clone(), w_max.clone(), w_absmax.clone()
    for i in range(clip.steps):
        f = 1.0 - (i * clip.shrink)  # a Python float, as in Q-DiT (same rounding of the factor)
        if sym:
            new_max = w_absmax * f
            scale, zero = _sym_scale(new_max, q_max)
        else:
            new_max, new_min = w_max * f, w_min * f
            scale, zero = _asym_scale(new_min, new_max, q_min, q_max)
        w_q = _fake_rows(rows, scale, zero, q_min, q_max)
        score = (rows - w_q).abs().pow(clip.p).flatten(1).mean(1, keepdim=True)
        better = score < best_score
        if sym:
            best_absmax = torch.where(better, new_max, best_absmax)
        else:
            best_min = torch.where(better, new_min, best_min)
            best_max = torch.where(better, new_max, best_max)
        best_score = torch.min(best_score, score)
    if sym:
        return _sym_scale(best_absmax, q_max)
    return _asym_scale(best_min, best_max, q_min, q_max)


def _percentile_params(rows: torch.Tensor, clip: Percentile, sym: bool, q_min: int, q_max: int):
    n = rows.shape[-1]
    k_hi = min(n, max(1, math.ceil(clip.percentile / 100 * n)))  # nearest rank
    if sym:
        absmax = rows.abs().kthvalue(k_hi, dim=-1, keepdim=True).values.clamp(min=RANGE_EPS)
        return _sym_scale(absmax, q_max)
    hi = rows.kthvalue(k_hi, dim=-1, keepdim=True).values
    lo = rows.kthvalue(n + 1 - k_hi, dim=-1, keepdim=True).values
    return _asym_scale(lo, hi, q_min, q_max)


@torch.no_grad()
def quant_params(
    x: torch.Tensor,
    bits: int,
    granularity: Granularity,
    sym: bool = False,
    clip: Clip | str | float = "max",
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for ``x`` under Q-DiT's rule, computed in ``x``'s dtype.

    Shapes: ``x`` with its last axis replaced by the number of groups (all ones
    for PerTensor). ``zero`` holds integers (as floats of ``x``'s dtype) in the
    code range; it is 0 when symmetric. ``clip``: ``"max"`` (Q-DiT's default),
    ``"mse"`` (Q-DiT's range search), ``"percentile"``, a ratio, or a clip
    object. ``check_finite=False`` skips the NaN/inf check (a device sync) on
    hot paths such as dynamic activation quantization.
    """
    check_tensor(x)
    q_min, q_max = qrange(bits, sym)
    clip = as_clip(clip)
    rows, pshape = _rows(x, granularity)
    if check_finite:
        require_finite(x)
    if isinstance(clip, MSE):
        scale, zero = _mse_params(rows, clip, sym, q_min, q_max)
    elif isinstance(clip, Percentile):
        scale, zero = _percentile_params(rows, clip, sym, q_min, q_max)
    elif sym:
        absmax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=RANGE_EPS)
        if clip.ratio < 1.0:
            absmax = absmax * clip.ratio
        scale, zero = _sym_scale(absmax, q_max)
    else:
        hi = rows.amax(dim=-1, keepdim=True)
        lo = rows.amin(dim=-1, keepdim=True)
        if clip.ratio < 1.0:
            hi, lo = hi * clip.ratio, lo * clip.ratio
        scale, zero = _asym_scale(lo, hi, q_min, q_max)
    return scale.reshape(pshape), zero.reshape(pshape)


@torch.no_grad()
def gptq_quant_params(
    x: torch.Tensor,
    bits: int,
    granularity: Granularity,
    sym: bool = False,
    clip_ratio: float = 1.0,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) under GPTQ's range rule (``Quantizer_GPTQ.find_params``), laid out as ``quant_params``.

    The range always includes 0: ``[min(min, 0), max(max, 0)]``; symmetric
    widens it to ``±absmax`` only for groups with a negative value (a group
    with no negative value keeps ``[0, max]``, GPTQ's quirk, kept for
    exactness); an all-zero group gets ``[-1, 1]``. ``scale = range * clip_ratio
    / (2^b - 1)``; asymmetric ``zero = round(-min / scale)`` (not clamped: with
    ``clip_ratio < 1`` it can leave ``[0, 2^b - 1]``, as in the original).
    GPTQ's symmetric grid is unsigned ``[0, 2^b - 1]`` around ``2^(b-1)``; here
    it is the same grid as signed codes with zero 0, which dequantizes to the
    same numbers.
    """
    check_tensor(x)
    check_bits(bits)
    MinMax(clip_ratio)  # validates the ratio
    rows, pshape = _rows(x, granularity)
    if check_finite:
        require_finite(x)
    maxq = 2**bits - 1
    origin = torch.zeros(rows.shape[0], device=rows.device, dtype=rows.dtype)
    xmin = torch.minimum(rows.min(1)[0], origin)
    xmax = torch.maximum(rows.max(1)[0], origin)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) * clip_ratio / maxq
    zero = torch.zeros_like(scale) if sym else torch.round(-xmin / scale)
    return scale.reshape(pshape), zero.reshape(pshape)


# ----------------------------------------------------------------------------
# Codes
# ----------------------------------------------------------------------------


@torch.no_grad()
def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool = False
) -> torch.Tensor:
    """Codes ``clamp(round(x / scale) + zero, q_min, q_max)``, shaped like x: int8 if sym, else uint8."""
    check_tensor(x)
    q_min, q_max = qrange(bits, sym)
    xg, s, z = _grouped(x, scale, zero)
    q = torch.clamp(torch.round(xg / s) + z, q_min, q_max)
    return q.reshape(x.shape).to(code_dtype(sym))


@torch.no_grad()
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` in the scale's dtype, shaped like ``q``."""
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise InvalidArgumentError(f"codes must be an integer tensor (from quantize), got {got}")
    if q.dim() == 0:
        raise InvalidArgumentError("codes must have at least one axis")
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise InvalidArgumentError("scale must be a floating-point tensor (as returned by quant_params)")
    qg, s, z = _grouped(q, scale, zero, what="codes")
    return ((qg.to(s.dtype) - z) * s).reshape(q.shape)


@torch.no_grad()
def fake_quantize(
    x: torch.Tensor,
    bits: int,
    granularity: Granularity,
    sym: bool = False,
    clip: Clip | str | float = "max",
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Quantize then dequantize, in ``x``'s dtype: exactly ``dequantize(quantize(x, *params), *params)``."""
    scale, zero = quant_params(x, bits, granularity, sym, clip, check_finite=check_finite)
    if scale.dtype != x.dtype:
        return dequantize(quantize(x, scale, zero, bits, sym), scale, zero)
    # The same operations in the same dtype without the integer round trip (codes are small
    # integers, exact in any float dtype), in place: about half the time of the two calls.
    q_min, q_max = qrange(bits, sym)
    xg, s, z = _grouped(x, scale, zero)
    q = xg / s
    q.round_().add_(z).clamp_(q_min, q_max).sub_(z).mul_(s)
    return q.reshape(x.shape)
