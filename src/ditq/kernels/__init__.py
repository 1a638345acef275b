"""Low-bit kernels and the byte layouts they read.

    packing  pack/unpack functions for int8, int4 (2 per byte) and 2-bit/ternary weights
             (the official TerDiT layout and ditq's kernel layout), documented bit by bit

``kernels`` imports nothing from the rest of ditq.
"""

from ditq.kernels.packing import (
    LAYOUTS_2BIT,
    PackingError,
    check_codes,
    pack_2bit,
    pack_int4,
    pack_ternary,
    packed_2bit_shape,
    repack_2bit,
    unpack_2bit,
    unpack_int4,
    unpack_ternary,
)

__all__ = [
    "LAYOUTS_2BIT",
    "PackingError",
    "check_codes",
    "pack_2bit",
    "pack_int4",
    "pack_ternary",
    "packed_2bit_shape",
    "repack_2bit",
    "unpack_2bit",
    "unpack_int4",
    "unpack_ternary",
]
