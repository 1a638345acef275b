"""Byte layouts of low-bit weights: pure pack/unpack functions, each layout documented bit by bit.

Codes are unsigned integers in ``[0, 2^bits)`` held one per element in a
``uint8`` tensor ``[out, in]`` (``out`` = output features, rows of the weight;
``in`` = input features, the reduction axis K of a matmul). Packing never
changes values: ``unpack(pack(c)) == c`` exactly, and every function checks
that codes fit their bit width.

Layouts
-------

``int8``  one code per byte, ``[out, in]``, row-major (C order). Nothing to pack;
    :func:`check_codes` validates.

``int4``  two codes per byte along ``in``: packed ``[out, in/2]``; byte ``j`` of a
    row holds code ``2j`` in its low nibble (bits 3-0) and code ``2j+1`` in its
    high nibble (bits 7-4). ``in`` must be even.

``int2`` / ternary, two layouts:

* ``"terdit"`` -- the official TerDiT checkpoint layout (Lucky-Lance/TerDiT,
  HQQ's ``pack_2bit_u8``), packed **along the output axis in quarters**: packed
  ``[out/4, in]``; with ``h = out/4``, byte ``[r, c]`` holds rows
  ``r, r+h, r+2h, r+3h`` of column ``c`` in bits 7-6, 5-4, 3-2, 1-0::

      P = C[0:h] << 6 | C[h:2h] << 4 | C[2h:3h] << 2 | C[3h:4h]

  ``out`` must be divisible by 4. This is what official checkpoints hold; it
  is read when loading them.
* ``"k4"`` -- ditq's kernel layout, four consecutive inputs per byte: packed
  ``[out, in/4]``; byte ``j`` of a row holds codes ``4j, 4j+1, 4j+2, 4j+3`` in
  bits 1-0, 3-2, 5-4, 7-6 (lowest first). A kernel unpacks one byte into four
  neighbouring K elements with shifts and a mask, so a row stays contiguous in
  memory. ``in`` must be divisible by 4.

Ternary weights ``w̃ ∈ {-1, 0, +1}`` are stored as 2-bit codes ``w̃ + 1``
(0, 1, 2; code 3 never occurs, and unpacking it as ternary is an error).

Scales and zero points (Q-DiT group-wise quantization) are not packed: a
float16/float32 tensor ``[out, in/g]`` row-major, one ``(scale, zero)`` per
output row and group of ``g`` consecutive inputs (``g = in`` for per-channel),
the same as :class:`ditq.quant.QuantLinear`'s ``w_scale``/``w_zero``. Ternary
layers carry one float scalar per layer (TerDiT's ``alphas`` or BitNet's γ).

This module imports nothing from ditq (kernels depend on nothing above them);
its errors are :class:`PackingError` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import torch

LAYOUTS_2BIT = ("terdit", "k4")
"""The 2-bit layouts: the official TerDiT one and ditq's kernel one."""


class PackingError(ValueError):
    """Codes or packed bytes that do not fit the layout asked for (one-line message)."""


def _check_uint8_2d(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise PackingError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise PackingError(f"{what} must be uint8, got {t.dtype}")
    if t.dim() != 2:
        raise PackingError(f"{what} must be 2-D [out, in], got shape {tuple(t.shape)}")


def check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` if it is a uint8 [out, in] tensor whose values fit ``bits`` bits; else a PackingError."""
    _check_uint8_2d(codes, "codes")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise PackingError(f"codes must be < {2**bits} for {bits}-bit packing, found {int(codes.max())}")
    return codes


# ----------------------------------------------------------------------------
# int4: two per byte along K
# ----------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] in 0..15 -> uint8 [out, in/2] (low nibble = even input)."""
    check_codes(codes, 4)
    if codes.shape[1] % 2:
        raise PackingError(f"int4 packing needs an even number of inputs, got {codes.shape[1]}")
    c = codes.reshape(codes.shape[0], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> uint8 codes [out, in]."""
    _check_uint8_2d(packed, "packed int4 weights")
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


# ----------------------------------------------------------------------------
# int2: the official TerDiT layout and the kernel layout
# ----------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS_2BIT:
        raise PackingError(f"unknown 2-bit layout {layout!r}; use one of {', '.join(LAYOUTS_2BIT)}")


def pack_2bit(codes: torch.Tensor, layout: str = "k4") -> torch.Tensor:
    """uint8 codes [out, in] in 0..3 -> packed uint8 in ``layout`` (see the module doc)."""
    _check_layout(layout)
    check_codes(codes, 2)
    out, k = codes.shape
    if layout == "terdit":
        if out % 4:
            raise PackingError(f"TerDiT packing needs output features divisible by 4, got {out}")
        h = out // 4
        return (
            codes[0:h] << 6 | codes[h : 2 * h] << 4 | codes[2 * h : 3 * h] << 2 | codes[3 * h :]
        ).contiguous()
    if k % 4:
        raise PackingError(f"k4 packing needs input features divisible by 4, got {k}")
    c = codes.reshape(out, k // 4, 4)
    return (c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6).contiguous()


def unpack_2bit(packed: torch.Tensor, layout: str = "k4") -> torch.Tensor:
    """Packed uint8 in ``layout`` -> uint8 codes [out, in] in 0..3."""
    _check_layout(layout)
    _check_uint8_2d(packed, "packed 2-bit weights")
    if layout == "terdit":  # quarters of the output rows, highest bits first
        return torch.cat([(packed >> s) & 0x03 for s in (6, 4, 2, 0)], dim=0)
    return torch.stack([(packed >> s) & 0x03 for s in (0, 2, 4, 6)], dim=-1).reshape(packed.shape[0], -1)


def packed_2bit_shape(out_features: int, in_features: int, layout: str = "k4") -> tuple[int, int]:
    """The shape of a packed [out, in] 2-bit weight in ``layout`` (checks divisibility)."""
    _check_layout(layout)
    if layout == "terdit":
        if out_features % 4:
            raise PackingError(f"TerDiT packing needs output features divisible by 4, got {out_features}")
        return out_features // 4, in_features
    if in_features % 4:
        raise PackingError(f"k4 packing needs input features divisible by 4, got {in_features}")
    return out_features, in_features // 4


def repack_2bit(packed: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Convert packed 2-bit weights from layout ``src`` to ``dst`` (e.g. official -> kernel)."""
    return packed if src == dst else pack_2bit(unpack_2bit(packed, src), dst)


# ----------------------------------------------------------------------------
# Ternary
# ----------------------------------------------------------------------------


def pack_ternary(w: torch.Tensor, layout: str = "k4") -> torch.Tensor:
    """Ternary values [out, in] in {-1, 0, +1} (any integer or float dtype) -> packed codes ``w + 1``."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise PackingError("ternary weights must be a 2-D tensor [out, in]")
    if w.numel() and (
        w.min() < -1 or w.max() > 1 or (w.is_floating_point() and not torch.equal(w, w.round()))
    ):
        raise PackingError("ternary weights must hold only -1, 0 and +1")
    return pack_2bit((w.to(torch.int16) + 1).to(torch.uint8), layout)


def unpack_ternary(packed: torch.Tensor, layout: str = "k4") -> torch.Tensor:
    """Packed ternary codes -> int8 [out, in] in {-1, 0, +1}; a code 3 is an error (not ternary)."""
    codes = unpack_2bit(packed, layout)
    if codes.numel() and int(codes.max()) == 3:
        raise PackingError("packed ternary weights hold the code 3, which is not a ternary value")
    return codes.to(torch.int8) - 1
