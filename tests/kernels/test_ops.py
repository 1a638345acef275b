"""The low-bit ops: references against independent float64 math, fake impls, dispatch, argument errors.

The reference implementations are what every fast implementation is tested
against (tests/kernels/test_cpu.py), so here each is checked against a direct
float64 computation from dequantized tensors: integer parts exactly, outputs to
float32 rounding. These tests call the ``ref_*`` functions directly; the ops
themselves may run a fast CPU backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ditq.kernels import KernelError, ops, pack_int4, pack_ternary


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def _rel(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------
# quantize_per_token_int8
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,group", [((5, 64), 0), ((2, 3, 96), 32), ((1, 7), 0), ((4, 1), 1)])
def test_quantize_reference_follows_the_absmax_rule(shape, group):
    x = torch.randn(shape, generator=_gen(1)) * 3
    q, s = ops.ref_quantize_per_token_int8(x, group)
    k = shape[-1]
    g = k if group == 0 else group
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], k // g)
    xg = x.double().reshape(*shape[:-1], k // g, g)
    amax = xg.abs().amax(-1)
    torch.testing.assert_close(s.double(), amax / 127, rtol=1e-6, atol=0)
    qg = q.reshape(xg.shape).double()
    # every code is the nearest level; the largest |x| of a group lands on +-127
    assert (qg.abs() <= 127).all()
    assert ((xg - qg * s.double().unsqueeze(-1)).abs() <= s.double().unsqueeze(-1) * (0.5 + 1e-5)).all()
    assert (qg.abs().amax(-1) == 127).all()


def test_quantize_reference_equals_bitnet_fake_quantization_bit_for_bit():
    from ditq.quant.ternary import fake_quant_act_int8

    x = torch.randn(64, 200, generator=_gen(2)) * torch.logspace(-3, 2, 64).unsqueeze(1)
    q, _ = ops.ref_quantize_per_token_int8(x)
    inv = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    assert torch.equal(fake_quant_act_int8(x), q.float() / inv)


def test_quantize_rounds_half_to_even_and_handles_zero_rows():
    # max 127 -> scale 1: x * 127/127 = x exactly, so .5 ties are visible
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0.0] * 6])
    q, s = ops.ref_quantize_per_token_int8(x)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2]
    assert q[1].tolist() == [0] * 6 and s[1].item() == pytest.approx(1e-5 / 127)


def test_quantize_asym_reference_equals_qdit_quantizer_bit_for_bit():
    from ditq.quant.granularity import act_granularity
    from ditq.quant.primitives import quant_params, quantize

    x = torch.randn(64, 96, generator=_gen(5)) * torch.logspace(-3, 2, 64).unsqueeze(1) + 0.2
    x[3] = 1.0  # constant row: the range floor
    for bits, group in ((8, 0), (4, 32), (6, 8), (2, 0)):
        q, s, z = ops.ref_quantize_per_token_asym(x, bits, group)
        s2, z2 = quant_params(x, bits, act_granularity(group), sym=False)
        assert torch.equal(q, quantize(x, s2, z2, bits, sym=False))
        assert torch.equal(s, s2.reshape(s.shape)) and torch.equal(z, z2.reshape(z.shape))


def test_quantize_accepts_half_precision_inputs():
    x = torch.randn(3, 40, generator=_gen(3))
    q16, s16 = ops.ref_quantize_per_token_int8(x.to(torch.bfloat16))
    q32, s32 = ops.ref_quantize_per_token_int8(x.to(torch.bfloat16).float())
    assert torch.equal(q16, q32) and torch.equal(s16, s32)


# ----------------------------------------------------------------------------
# Integer linears against float64
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (3, 33, 5), (17, 130, 9)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_w8a8_reference_vs_float64(m, k, n, per_channel):
    xq, wq = _int8((2, m, k), 10), _int8((n, k), 11)
    xs = torch.rand(2, m, 1, generator=_gen(12)) + 0.1
    ws = torch.rand(n if per_channel else 1, generator=_gen(13)) + 0.1
    bias = torch.randn(n, generator=_gen(14))
    out = ops.ref_w8a8_linear(xq, xs, wq, ws, bias)
    assert out.shape == (2, m, n) and out.dtype == torch.float32
    acc = xq.double() @ wq.double().T
    expected = acc * xs.double() * ws.double() + bias.double()
    assert _rel(out, expected) <= 1e-6
    # the integer part alone is exact (unit scales, no bias, |acc| < 2^24)
    exact = ops.ref_w8a8_linear(xq, torch.ones_like(xs), wq, torch.ones(1))
    assert torch.equal(exact, (xq.long() @ wq.long().T).float())


def test_w8a8_reference_extreme_codes_stay_exact_in_int32():
    k = 4096  # -128 * -128 * 4096 = 2^26: beyond float32's exact integers, within int32
    xq = torch.full((2, k), -128, dtype=torch.int8)
    wq = torch.full((3, k), -128, dtype=torch.int8)
    acc = ops._int_matmul(xq.reshape(-1, k), wq)
    assert acc.dtype == torch.int32 and (acc == 2**26).all()


def test_w8a8_out_dtype():
    xq, wq = _int8((4, 16), 20), _int8((6, 16), 21)
    out = ops.ref_w8a8_linear(xq, torch.ones(4, 1), wq, torch.ones(6), None, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (xq.float() @ wq.float().T).to(torch.bfloat16))


@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (3, 36, 5), (17, 1000, 7)])
def test_w158a8_reference_vs_float64(m, k, n):
    xq = _int8((m, k), 30)
    w = torch.randint(-1, 2, (n, k), generator=_gen(31))
    xs = torch.rand(m, 1, generator=_gen(32)) + 0.1
    ws = torch.rand(n, generator=_gen(33)) + 0.1
    bias = torch.randn(n, generator=_gen(34))
    for scale in (ws, ws[:1]):
        out = ops.ref_w158a8_linear(xq, xs, pack_ternary(w), scale, bias)
        expected = (xq.double() @ w.double().T) * xs.double() * scale.double() + bias.double()
        assert _rel(out, expected) <= 1e-6
    exact = ops.ref_w158a8_linear(xq, torch.ones(m, 1), pack_ternary(w), torch.ones(1))
    assert torch.equal(exact, (xq.long() @ w.long().T).float())


def _w4a8_case(m, k, n, ga, gw, asym, seed=40):
    """Random Q-DiT-format inputs and their float64 dequantized result."""
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


@pytest.mark.parametrize(
    "k,ga,gw",
    [(64, 64, 64), (128, 128, 32), (128, 32, 64), (192, 48, 32), (8, 2, 4)],
    ids=["per-token/per-channel", "per-token/g32", "a32/w64", "a48/w32 (gcd 16)", "tiny"],
)
@pytest.mark.parametrize("asym", [True, False], ids=["uint8+zero", "int8"])
def test_w4a8_reference_vs_float64(k, ga, gw, asym):
    args, expected = _w4a8_case(5, k, 7, ga, gw, asym)
    out = ops.ref_w4a8_linear(*args)
    assert out.shape == (5, 7)
    assert _rel(out, expected) <= 1e-5


def test_w4a8_integer_part_is_exact_with_zero_points():
    # unit scales: each segment's (q_w - z_w)(q_x - z_x) sum is an exact integer
    (xq, sx, zx, wp, sw, zw, _), _ = _w4a8_case(3, 64, 4, 32, 16, asym=True)
    out = ops.ref_w4a8_linear(xq, torch.ones_like(sx), zx, wp, torch.ones_like(sw), zw)
    from ditq.kernels import unpack_int4

    a = xq.long() - zx.long().repeat_interleave(32, 1)
    b = unpack_int4(wp).long() - zw.long().repeat_interleave(16, 1)
    assert torch.equal(out, (a @ b.T).float())


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
# Weight-only linears
# ----------------------------------------------------------------------------


def test_ternary_linear_reference_vs_float64_and_ternarylinear():
    from ditq.quant.ternary import TernaryLinear

    n, k = 12, 40
    w = torch.randint(-1, 2, (n, k), generator=_gen(50))
    layer = TernaryLinear(k, n, bias=True)
    with torch.no_grad():
        layer.weight.copy_(pack_ternary(w))
        layer.alphas.fill_(0.37)
        layer.bias.normal_()
    x = torch.randn(3, 4, k, generator=_gen(51))
    out = ops.ref_ternary_linear(x, layer.weight, layer.alphas, layer.bias)
    assert torch.equal(out, layer(x))  # bit for bit: same operations
    expected = x.double() @ (0.37 * w.double()).T + layer.bias.double()
    assert _rel(out, expected) <= 1e-5
    # per-output-channel scales, bf16 activations
    s = torch.rand(n, generator=_gen(52)) + 0.5
    out = ops.ref_ternary_linear(x.bfloat16(), pack_ternary(w), s, None)
    assert out.dtype == torch.bfloat16
    assert _rel(out, x.double() @ (s.double()[:, None] * w.double()).T) <= 2e-2


def test_int4_linear_reference_vs_float64_and_quantlinear_weight():
    from ditq.quant import QDiTConfig
    from ditq.quant.nn import QuantLinear

    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 10)
    layer = QuantLinear.from_float(linear, QDiTConfig(w_bits=4, a_bits=None, w_group=32))
    x = torch.randn(7, 96)
    out = ops.ref_int4_linear(x, pack_int4(layer.qweight), layer.w_scale, layer.w_zero, layer.bias.detach())
    assert torch.equal(out, F.linear(x, layer.dequantized_weight(), layer.bias))
    zero = layer.w_zero.double().repeat_interleave(32, 1)
    wd = (layer.qweight.double() - zero) * layer.w_scale.double().repeat_interleave(32, 1)
    assert _rel(out, x.double() @ wd.T + layer.bias.double()) <= 1e-5


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
    out, ref = op(*args), ops.REFERENCE[name](*args)
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
        torch.testing.assert_close(ops.w8a8_linear(*args), ops.ref_w8a8_linear(*args))
        sentinel = torch.full((3, 5), 7.0)
        ops.register_impl("w8a8_linear", "cpu", lambda *a: sentinel.clone())
        assert torch.equal(ops.w8a8_linear(*args), sentinel)
        assert calls == ["declined"]
    finally:
        ops.register_impl("w8a8_linear", "cpu", previous)
    with pytest.raises(KernelError, match="unknown op"):
        ops.register_impl("w9a9_linear", "cpu", None)


# ----------------------------------------------------------------------------
# Argument errors: one line, saying what was wrong
# ----------------------------------------------------------------------------


def _bad_calls():
    xq, xs = _int8((3, 16), 80), torch.ones(3, 1)
    w8, ws = _int8((5, 16), 81), torch.ones(5)
    w2 = pack_ternary(torch.zeros(5, 16))
    x = torch.randn(3, 16)
    x3 = x.reshape(1, 3, 16)
    sw, zw = torch.ones(5, 2), torch.zeros(5, 2)
    w4 = torch.zeros(5, 8, dtype=torch.uint8)
    return [
        ("quantize_per_token_int8", (xq, 0), "x must be a floating-point tensor"),
        ("quantize_per_token_int8", (x, 5), "group must be 0"),
        ("quantize_per_token_int8", (torch.randn(3, 0), 0), "K >= 1"),
        ("quantize_per_token_asym", (xq, 8, 0), "x must be a floating-point tensor"),
        ("quantize_per_token_asym", (x, 9, 0), "bits must be an integer in 2..8"),
        ("quantize_per_token_asym", (x, 8, 5), "group must be 0"),
        ("layernorm_modulate_quantize_int8", (x, x, x, 1e-6), "x must be 3-D"),
        ("layernorm_modulate_quantize_int8", (x3, x[:2], x[:1], 1e-6), "shift must be"),
        ("layernorm_modulate_quantize_int8", (x3, x[:1], x[:1], 0.0), "eps must be a positive"),
        ("rmsnorm_modulate_quantize_int8", (x3, x[0, :5], x[:1], x[:1], 1e-5), "weight must be"),
        ("rmsnorm_modulate_quantize_int8", (x3, x[0].double(), x[:1], x[:1], 1e-5), "weight must be"),
        ("rmsnorm_modulate_quantize_int8", (x3, x[0], x[:1], x[:1].T, 1e-5), "scale must be"),
        ("swiglu_quantize_int8", (x, x[:2]), "up must have gate's shape"),
        ("swiglu_quantize_int8", (x, x.double()), "up must be"),
        ("swiglu_quantize_int8", (xq, xq), "gate must be a floating-point tensor"),
        ("w8a8_linear", (xq.float(), xs, w8, ws), "xq must be torch.int8"),
        ("w8a8_linear", (xq, xs, _int8((5, 17), 82), ws), "K = 16"),
        ("w8a8_linear", (xq, torch.ones(3, 2), w8, ws), "one scale per token"),
        ("w8a8_linear", (xq, torch.ones(4, 1), w8, ws), "leading shape"),
        ("w8a8_linear", (xq, xs, w8, torch.ones(3)), "per output channel"),
        ("w8a8_linear", (xq, xs, w8, ws, torch.ones(4)), "bias must be"),
        ("w8a8_linear", (xq, xs, w8, ws, None, torch.int32), "out_dtype"),
        ("w8a8_linear", (_int8((1, 70000), 83), torch.ones(1, 1), _int8((1, 70000), 84), ws[:1]), "exceeds"),
        ("w158a8_linear", (_int8((3, 18), 85), xs, w2, ws[:1]), "multiple of 4"),
        ("w158a8_linear", (xq, xs, w8, ws[:1]), "w_packed must be torch.uint8"),
        ("w4a8_linear", (xq, xs, torch.zeros(3, 1), w4, sw, zw), "int8 codes without x_zero"),
        ("w4a8_linear", (xq.to(torch.uint8), xs, None, w4, sw, zw), "uint8 codes with x_zero"),
        ("w4a8_linear", (xq, xs, None, w4, torch.ones(5, 3), torch.zeros(5, 3)), "g dividing"),
        ("w4a8_linear", (xq, xs, None, w4[:, :7], sw, zw), "K/2"),
        ("ternary_linear", (x, w2[:, :3], ws), "K/4"),
        ("int4_linear", (x, w4, sw, zw[:, :1]), "w_scale and w_zero"),
    ]


@pytest.mark.parametrize("name,args,match", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise_one_line_errors(name, args, match):
    with pytest.raises(KernelError, match=match) as info:
        getattr(ops, name)(*args)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(name)
