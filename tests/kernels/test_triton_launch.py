"""The host side of the Triton kernels (ditq.kernels.triton.launch): the calls it declines return
``NotImplemented``, so the op runs its reference. How these tests run (the interpreter, in a
subprocess, on a CPU-only machine) is told in test_triton.py."""

from __future__ import annotations

import torch
from triton_helpers import DEVICE, _dev, _gen, _int4, _int8, _ternary, _w4a8_inputs, needs_kernels

from ditq.kernels import ops, reference


@needs_kernels
def test_producer_quantizers_decline_float64(launch):
    """float64 (and mixed dtypes) are declined, so the op runs its reference."""
    x = torch.randn(2, 3, 24, generator=_gen(50), dtype=torch.float64)
    shift, scale = torch.randn(2, 2, 24, generator=_gen(51), dtype=torch.float64)
    x, shift, scale = _dev(x, shift, scale)
    assert launch.layernorm_modulate_quantize_int8(x, shift, scale, 1e-6) is NotImplemented
    assert launch.gelu_quantize_int8(x) is NotImplemented
    x32, s16 = x.float(), shift.half()  # mixed dtypes (the op's checks refuse them first)
    assert launch.layernorm_modulate_quantize_int8(x32, s16, s16, 1e-6) is NotImplemented
    weight = _dev(torch.randn(24, generator=_gen(52), dtype=torch.float64))[0]
    assert launch.rmsnorm_modulate_quantize_int8(x, weight, shift, scale, 1e-5) is NotImplemented
    assert launch.swiglu_quantize_int8(x, x) is NotImplemented
    w32 = weight.float()
    assert launch.rmsnorm_modulate_quantize_int8(x32, w32, s16, s16, 1e-5) is NotImplemented
    assert launch.swiglu_quantize_int8(x32, x.half()) is NotImplemented
    empty, s32 = x32[:, :0], shift.float()  # samples without tokens
    assert launch.rmsnorm_modulate_quantize_int8(empty, w32, s32, s32, 1e-5) is NotImplemented
    assert launch.swiglu_quantize_int8(empty, empty) is NotImplemented

    # Through the op, with the Triton functions as the implementations of the tensors' device
    # (on CPU tensors, the interpreter's): the reference's numbers.
    calls = {
        "layernorm_modulate_quantize_int8": (x, shift, scale, 1e-6),
        "gelu_quantize_int8": (x,),
        "rmsnorm_modulate_quantize_int8": (x, weight, shift, scale, 1e-5),
        "swiglu_quantize_int8": (x, 2 * x),
    }
    dev = x.device.type
    before = {name: ops.registered_impl(name, dev) for name in calls}
    try:
        for name in calls:
            ops.register_impl(name, dev, getattr(launch, name))
        with ops.use_backend("auto"):
            for name, args in calls.items():
                out, ref = getattr(ops, name)(*args), reference.REFERENCE[name](*args)
                assert all(torch.equal(o, r) for o, r in zip(out, ref, strict=True)), name
    finally:
        for name, fn in before.items():
            ops.register_impl(name, dev, fn)


@needs_kernels
def test_unsupported_calls_return_not_implemented(launch):
    # w4a8 with weight groups of 8: constant-scale segments shorter than an int8 K tile.
    xq, xs, xz, w, w_scale, w_zero = _w4a8_inputs(5, 20, 64, 64, 8, False, "groups", 0)
    assert launch.w4a8_linear(*_dev(xq, xs, xz, w, w_scale, w_zero, None), torch.float32) is NotImplemented
    # uint8 activations without zero points
    xu = xq.view(torch.uint8)
    assert launch.w4a8_linear(*_dev(xu, xs, None, w, w_scale, w_zero, None), torch.float32) is NotImplemented
    # float64 activations (no float64 tl.dot), K not a multiple of 4 for ternary
    x64 = torch.randn(3, 8, dtype=torch.float64)
    assert launch.ternary_linear(*_dev(x64, _ternary(4, 8, 0), torch.ones(1), None)) is NotImplemented
    x = torch.randn(3, 10)
    packed = torch.zeros(4, 2, dtype=torch.uint8)
    assert launch.ternary_linear(*_dev(x, packed, torch.ones(1), None)) is NotImplemented
    # int4 with scales and zero points of different dtypes; K not a multiple of the group
    x = torch.randn(3, 24)
    w4 = _int4(4, 24, 0)
    s32, z16 = torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.float16)
    assert launch.int4_linear(*_dev(x, w4, s32, z16, None)) is NotImplemented
    assert launch.int4_linear(*_dev(x, w4, torch.ones(4, 5), torch.zeros(4, 5), None)) is NotImplemented
    # empty inputs; tensors on two devices
    assert launch.quantize_per_token_int8(torch.empty(0, 8, device=DEVICE), 0) is NotImplemented
    args = _dev(_int8((3, 8), 0), torch.ones(3, 1), _int8((4, 8), 1), torch.ones(1))
    assert launch.w8a8_linear(*args, torch.zeros(4, device="meta"), torch.float32) is NotImplemented
