"""Low-bit kernels and the byte layouts they read.

    packing    pack/unpack functions for int8, int4 (2 per byte) and 2-bit/ternary weights
               (the official TerDiT layout and ditq's kernel layout), documented bit by bit
    ops        the low-bit operators (torch.ops.ditq.*) and the module to call them through: it
               re-exports the backend choice and the fusion policy of ``dispatch``
    checks     KernelError and the argument checks of the ops (shapes and dtypes only)
    reference  the plain-PyTorch reference of every op: what it computes
    dispatch   which implementation runs (auto | reference | cpu | triton: set_backend,
               use_backend), what a call would run (implementation, has_fast_impl), and when
               producers fused with int8 quantization hand Int8Tokens to integer linears
               (should_fuse; set_fusion / use_fusion turn that off)
    cpu        the CPU implementations (C++ kernels built on first use, with fallbacks)
    triton     the CUDA implementations (Triton kernels, registered when a GPU is present;
               tested on CPU in Triton's interpreter)

``kernels`` imports nothing from the rest of ditq but ``ditq.errors``.
"""

from ditq.kernels import cpu, ops
from ditq.kernels.ops import (
    BACKENDS,
    Int8Tokens,
    KernelError,
    available_backends,
    check_backend,
    gelu_quantize_int8,
    get_backend,
    has_fast_impl,
    int4_linear,
    layernorm_modulate_quantize_int8,
    quantize_per_token_asym,
    quantize_per_token_int8,
    register_impl,
    resolve_backend,
    rmsnorm_modulate_quantize_int8,
    set_backend,
    set_fusion,
    should_fuse,
    swiglu_quantize_int8,
    ternary_linear,
    use_backend,
    use_fusion,
    w4a8_linear,
    w8a8_linear,
    w158a8_linear,
)
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
    "BACKENDS",
    "Int8Tokens",
    "KernelError",
    "LAYOUTS_2BIT",
    "PackingError",
    "available_backends",
    "check_backend",
    "check_codes",
    "cpu",
    "gelu_quantize_int8",
    "get_backend",
    "has_fast_impl",
    "int4_linear",
    "layernorm_modulate_quantize_int8",
    "ops",
    "pack_2bit",
    "pack_int4",
    "pack_ternary",
    "packed_2bit_shape",
    "quantize_per_token_asym",
    "quantize_per_token_int8",
    "register_impl",
    "repack_2bit",
    "resolve_backend",
    "rmsnorm_modulate_quantize_int8",
    "set_backend",
    "set_fusion",
    "should_fuse",
    "swiglu_quantize_int8",
    "ternary_linear",
    "unpack_2bit",
    "unpack_int4",
    "unpack_ternary",
    "use_backend",
    "use_fusion",
    "w4a8_linear",
    "w8a8_linear",
    "w158a8_linear",
]
