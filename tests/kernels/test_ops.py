"""The op definitions: each op against its reference and its fake implementation, the eager shortcut
past the custom op's dispatch, torch's opcheck, tracing under torch.export, dispatch to a registered
implementation; and an op against the quantized layer whose numbers it must reproduce."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ditq.kernels import KernelError, ops, pack_int4, pack_ternary, reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def _rel(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def _w4a8_case(m, k, n, ga, gw, asym, seed=40):
    """Random Q-DiT-format inputs and their float64 dequantized result (as in test_reference.py)."""
    g = _gen(seed)
    qw = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zw = torch.randint(0, 16, (n, k // gw), generator=g).float()
    sw = torch.rand(n, k // gw, generator=g) * 0.1 + 0.01
    if asym:
        xq = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
        zx = torch.randint(0, 256, (m, k // ga), generator=g).float()
    else:
        xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        zx = None
    sx = torch.rand(m, k // ga, generator=g) * 0.05 + 0.01
    bias = torch.randn(n, generator=g)
    wd = (qw.double() - zw.double().repeat_interleave(gw, 1)) * sw.double().repeat_interleave(gw, 1)
    zxd = zx.double().repeat_interleave(ga, 1) if asym else 0.0
    xd = (xq.double() - zxd) * sx.double().repeat_interleave(ga, 1)
    expected = xd @ wd.T + bias.double()
    return (xq, sx, zx, pack_int4(qw), sw, zw, bias), expected


def test_w4a8_matches_quantlinear_forward():
    from ditq.quant import QDiTConfig
    from ditq.quant.nn import QuantLinear
    from ditq.quant.primitives import quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 24)
    layer = QuantLinear.from_float(linear, QDiTConfig(w_bits=4, a_bits=8, w_group=32, a_group=64))
    x = torch.randn(2, 5, 128)
    sx, zx = layer.act_quant.params(x)
    xq = quantize(x, sx, zx, 8, False)
    out = ops.w4a8_linear(
        xq, sx, zx, pack_int4(layer.qweight), layer.w_scale, layer.w_zero, layer.bias.detach()
    )
    expected = layer(x)
    assert out.shape == expected.shape
    assert _rel(out, expected.double()) <= 1e-4


# ----------------------------------------------------------------------------
# The ops: schemas, fake impls (tracing), dispatch
# ----------------------------------------------------------------------------


def _small_args():
    xq, xs = _int8((3, 16), 60), torch.rand(3, 1) + 0.1
    w8, ws = _int8((5, 16), 61), torch.rand(5) + 0.1
    w2 = pack_ternary(torch.randint(-1, 2, (5, 16), generator=_gen(62)))
    (aq, asx, azx, a4, asw, azw, ab), _ = _w4a8_case(3, 16, 5, 8, 4, asym=True)
    x = torch.randn(3, 16, generator=_gen(63))
    b = torch.randn(5, generator=_gen(64))
    return {
        "quantize_per_token_int8": (x, 0),
        "quantize_per_token_asym": (x, 8, 4),
        "layernorm_modulate_quantize_int8": (x.reshape(1, 3, 16), x[:1], x[1:2], 1e-6),
        "gelu_quantize_int8": (x,),
        "rmsnorm_modulate_quantize_int8": (x.reshape(1, 3, 16), x[2].abs() + 0.5, x[:1], x[1:2], 1e-5),
        "swiglu_quantize_int8": (x, x.flip(0)),
        "w8a8_linear": (xq, xs, w8, ws, b, torch.float32),
        "w158a8_linear": (xq, xs, w2, ws[:1], None, torch.bfloat16),
        "w4a8_linear": (aq, asx, azx, a4, asw, azw, ab, torch.float32),
        "ternary_linear": (x, w2, ws, b),
        "int4_linear": (x, a4, asw, azw, ab),
    }


@pytest.mark.parametrize("name", ops.OPS)
def test_op_matches_reference_and_fake(name):
    args = _small_args()[name]
    op = getattr(torch.ops.ditq, name)
    out, ref = op(*args), reference.REFERENCE[name](*args)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fakes = op(*fake_args)
    fakes = fakes if isinstance(fakes, tuple) else (fakes,)
    for f, r in zip(fakes, refs, strict=True):
        assert f.shape == r.shape and f.dtype == r.dtype


@pytest.mark.parametrize("name", ops.OPS)
def test_the_eager_shortcut_equals_the_custom_op(name):
    # plain eager tensors skip the custom op's dispatch (it costs as much as a small GEMM); the
    # results must be those of torch.ops.ditq.<name>, which fakes, tracing and gradients still take
    args = _small_args()[name]
    assert getattr(ops, name).custom_op is not None
    out, via_op = getattr(ops, name)(*args), getattr(torch.ops.ditq, name)(*args)
    outs, ops_ = (out, via_op) if isinstance(out, tuple) else ((out,), (via_op,))
    for o, v in zip(outs, ops_, strict=True):
        assert torch.equal(o, v)
    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if floats:  # an input that wants a gradient goes through the custom op, which has no formula
        wants = list(args)
        wants[floats[0]] = args[floats[0]].clone().requires_grad_()
        result = getattr(ops, name)(*wants)
        first = result[-1] if isinstance(result, tuple) else result
        if first.requires_grad:
            with pytest.raises(RuntimeError, match="no autograd formula"):
                first.float().sum().backward()


@pytest.mark.parametrize("name", ["w8a8_linear", "w158a8_linear", "quantize_per_token_int8"])
def test_opcheck(name):
    # torch's own consistency checks of a custom op: schema, fake impl, dispatch
    args = _small_args()[name]
    torch.library.opcheck(
        getattr(torch.ops.ditq, name).default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


def test_ops_trace_with_leading_axes_under_torch_export():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("wq", _int8((6, 32), 70))
            self.register_buffer("ws", torch.rand(6) + 0.1)

        def forward(self, x):
            q, s = ops.quantize_per_token_int8(x)
            return ops.w8a8_linear(q, s, self.wq, self.ws, None, torch.float32)

    x = torch.randn(2, 3, 32)
    ep = torch.export.export(Layer(), (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "ditq.quantize_per_token_int8.default" in targets and "ditq.w8a8_linear.default" in targets
    assert ep.module()(x).shape == (2, 3, 6)


def test_register_impl_dispatches_and_falls_back_on_notimplemented():
    args = _small_args()["w8a8_linear"]
    previous = ops.registered_impl("w8a8_linear", "cpu")
    calls = []
    try:
        ops.register_impl("w8a8_linear", "cpu", lambda *a: calls.append("declined") or NotImplemented)
        torch.testing.assert_close(ops.w8a8_linear(*args), reference.ref_w8a8_linear(*args))
        sentinel = torch.full((3, 5), 7.0)
        ops.register_impl("w8a8_linear", "cpu", lambda *a: sentinel.clone())
        assert torch.equal(ops.w8a8_linear(*args), sentinel)
        assert calls == ["declined"]
    finally:
        ops.register_impl("w8a8_linear", "cpu", previous)
    with pytest.raises(KernelError, match="unknown op"):
        ops.register_impl("w9a9_linear", "cpu", None)
