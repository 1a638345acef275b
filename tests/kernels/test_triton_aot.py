"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

The recording tests need Triton only; the compile tests need Triton's NVIDIA
backend and its bundled ptxas (``aot.available()``), which the Linux wheels ship.
The compile test is the guard on the autotuning configs: every config the GEMMs
may pick at a DiT-XL/2 layer must compile, software-pipeline its K loop, use
tensor cores, fit shared memory and not spill registers.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

if HAS_TRITON:
    from ditq.kernels.triton import aot, launch

needs_nvidia_backend = pytest.mark.skipif(
    not HAS_TRITON or not aot.available(), reason="Triton's NVIDIA backend / ptxas missing"
)

SHARED_MAX = 232448  # 227 KiB: the most dynamic shared memory one CTA may use on sm_90


@pytest.mark.parametrize("op", aot.OPS if HAS_TRITON else [])
def test_recording_collects_the_launch_and_runs_nothing(op):
    launches = aot.record(op, *aot.meta_args(op, 33, 256, 96))
    assert len(launches) == 1
    (rec,) = launches
    assert rec.kernel.__class__.__name__ in ("JITFunction", "Autotuner")
    assert all(getattr(a, "device", torch.device("meta")).type == "meta" for a in rec.args)


def test_meta_tensors_are_declined_outside_recording():
    args = aot.meta_args("w8a8_linear", 4, 64, 32)
    assert launch.w8a8_linear(*args) is NotImplemented
    with launch.recording() as launches:
        out = launch.w8a8_linear(*args)
    assert out.device.type == "meta" and out.shape == (4, 32) and len(launches) == 1


def test_recording_does_not_nest_and_bad_requests_are_one_line_errors():
    with launch.recording(), pytest.raises(RuntimeError, match="do not nest"):
        with launch.recording():
            pass
    with pytest.raises(ValueError, match="unknown op 'w2a2_linear'"):
        aot.record("w2a2_linear")
    with pytest.raises(ValueError, match="unknown op"):
        aot.meta_args("w2a2_linear", 1, 64, 64)
    # W4A8 with groups of 8: constant-scale segments shorter than an int8 K tile (the reference runs).
    with pytest.raises(ValueError, match="decline"):
        aot.record("w4a8_linear", *aot.meta_args("w4a8_linear", 4, 64, 32, group=8))


@needs_nvidia_backend
def test_arguments_are_specialized_as_the_runtime_does():
    from triton.backends.compiler import GPUTarget

    def source(k):
        (rec,) = aot.record("w8a8_linear", *aot.meta_args("w8a8_linear", 8, k, 64))
        fn = aot.jit_function(rec)
        params = {**aot.kernel_arguments(rec), "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1}
        src = aot._source(fn, params, GPUTarget("cuda", aot.HOPPER, 32))
        return fn.arg_names, src

    names, src = source(1152)
    divisible = {names[i[0]] for i, a in src.attrs.items() if ["tt.divisibility", 16] in a}
    assert {"x_ptr", "w_ptr", "out_ptr", "K", "N"} <= divisible
    assert src.signature["ws_stride"] == "constexpr"  # an integer 1 is baked in
    assert src.signature["x_ptr"] == "*i8" and src.signature["out_ptr"] == "*bf16"
    names, src = source(1144)  # K % 16 == 8: no divisibility hint, so no 16-byte vector loads
    divisible = {names[i[0]] for i, a in src.attrs.items() if ["tt.divisibility", 16] in a}
    assert "K" not in divisible and "x_ptr" in divisible


@needs_nvidia_backend
@pytest.mark.slow
@pytest.mark.parametrize(
    "op", ["w8a8_linear", "w158a8_linear", "w4a8_linear", "ternary_linear", "int4_linear"]
)
def test_every_gemm_config_compiles_well_for_hopper(op):
    """All configs that survive pruning at M = 8192 (that is every one) for DiT-XL/2's fc1."""
    variants = aot.compile_op(op, *aot.meta_args(op, 8192, 1152, 4608))
    assert len(variants) >= 8
    for v in variants:
        assert v.error is None, (v.config, v.error)
        assert v.shared_bytes <= SHARED_MAX, v.config
        assert v.registers is not None and not v.spills, (v.config, v.registers, v.stack_bytes)
        assert v.pipelined_loads > 0, v.config  # cp.async multi-buffering of the K loop
        assert v.mma == ("wgmma" if v.config["BLOCK_M"] >= 64 else "mma.sync"), v.config
        assert aot.ctas_per_sm(v) >= 1 and v.programs > 0


@needs_nvidia_backend
@pytest.mark.parametrize("op", ["quantize_per_token_int8", "quantize_per_token_asym"])
def test_row_quantizers_compile_for_hopper_without_fma(op):
    (v,) = aot.compile_op(op, *aot.meta_args(op, 512, 1152, 1))
    assert v.error is None and not v.spills and v.mma == "none"
    assert v.fma_f32 == 0  # bit-exact codes: every product rounded before it is added
    assert v.programs == 256  # rows of 1152 in 2048-wide tiles, 2 rows per program


@needs_nvidia_backend
@pytest.mark.parametrize(
    "op,k,programs",
    [
        ("layernorm_modulate_quantize_int8", 1152, 8192),
        ("gelu_quantize_int8", 4608, 16384),
        ("rmsnorm_modulate_quantize_int8", 3072, 16384),
        ("swiglu_quantize_int8", 8192, 16384),
    ],
)
def test_fused_producer_quantizers_compile_for_hopper(op, k, programs):
    """Batch 64 (256 tokens each). DiT-XL/2: the norm before qkv / fc1, the GELU before fc2;
    TerDiT-4.2B: the RMSNorm before the attention and w1 / w3 (dim 3072), the SwiGLU before w2."""
    (v,) = aot.compile_op(op, *aot.meta_args(op, 64 * 256, k, 1))
    assert v.error is None and not v.spills and v.mma == "none"
    assert v.programs == programs  # rows of 1152 two per 2048-wide tile; longer rows one per program
    if op.endswith("norm_modulate_quantize_int8"):
        assert v.fma_f32 == 0  # statistics, modulation and codes: every product rounded before a sum
    # GELU and SiLU have FMAs by design: PyTorch's kKappa * x^3 + x as CUDA compiles it, and
    # libdevice's tanh and exp.
