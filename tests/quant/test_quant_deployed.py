"""ditq.quant.deployed: DeployedQuantLinear on the integer kernels of ditq.kernels: which settings hit which
op, the numbers against the fake-quant path, input codes against the act quantizer's on every backend,
when the float path runs (kernel_plan, training, use_kernels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditq.kernels import cpu, ops
from ditq.quant import LayerQuant, QuantLinear, kernel_plan, set_kernels
from ditq.quant.deployed import DeployedQuantLinear
from ditq.quant.nn import kernel_op_for


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    ops.set_backend("auto")


def _linear(in_f: int = 64, out_f: int = 24) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _deployed(linear: nn.Linear, cfg) -> QuantLinear:
    """``QuantLinear.from_float``, converted to the deployed layer when its settings fit an op."""
    q = QuantLinear.from_float(linear, cfg)
    return DeployedQuantLinear.from_quant(q).train(q.training) if q.kernel_op else q


def _kernel_for(q: QuantLinear, x) -> str | None:
    return q.kernel_for(x) if isinstance(q, DeployedQuantLinear) else None


@pytest.mark.parametrize(
    "cfg, op",
    [
        (LayerQuant(w_bits=4, w_group=32, a_bits=8), "w4a8_linear"),  # Q-DiT W4A8: asym uint8 inputs
        (LayerQuant(w_bits=4, w_group=0, w_sym=True, a_bits=8, a_group=16, a_sym=True), "w4a8_linear"),
        (LayerQuant(w_bits=3, w_group=16, a_bits=6, a_group=-1), "w4a8_linear"),
        (LayerQuant(w_bits=4, w_group=32, a_bits=None), "int4_linear"),
        (LayerQuant(w_bits=8, w_group=0, w_sym=True, a_bits=8, a_sym=True), "w8a8_linear"),
        (LayerQuant(w_bits=6, w_group=0, w_sym=True, a_bits=7, a_sym=True, a_group=-1), "w8a8_linear"),
        (LayerQuant(w_bits=8, w_group=0, w_sym=True, a_bits=8, a_sym=False), None),  # asym inputs
        (LayerQuant(w_bits=8, w_group=32, w_sym=True, a_bits=8, a_sym=True), None),  # 8-bit groups
        (LayerQuant(w_bits=8, w_group=0, a_bits=8, a_sym=True), None),  # asym 8-bit weights
        (LayerQuant(w_bits=4, w_group=32, a_bits=8, dynamic=False), None),  # static ranges
        (LayerQuant(w_bits=8, w_group=0, a_bits=None), None),
    ],
)
def test_settings_pick_an_op_and_its_numbers_match_fake_quant(cfg, op):
    assert kernel_op_for(cfg, 64) == op
    q = _deployed(_linear(), cfg).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        if not cfg.dynamic:  # static ranges: calibrate on x
            q.act_quant.calibrating = True
            q(x)
            q.act_quant.calibrating = False
        q.use_kernels = False
        fake = q(x)
        q.use_kernels = True
        with ops.use_backend("reference"):  # forces the ops (reference impls) wherever settings fit
            assert _kernel_for(q, x) == op
            out = q(x)
    assert out.shape == fake.shape and out.dtype == fake.dtype
    if op is None or op == "int4_linear":  # the float path, or the same float operations
        assert torch.equal(out, fake)
    else:
        assert _rel(out, fake) < 1e-5


@pytest.mark.parametrize("a_bits,a_group", [(8, 0), (8, 16), (4, 0), (6, 32)])
def test_asymmetric_input_codes_equal_the_act_quantizers_on_every_backend(a_bits, a_group):
    from ditq.quant.primitives import quantize

    cfg = LayerQuant(w_bits=4, w_group=32, a_bits=a_bits, a_group=a_group)
    q = _deployed(_linear(), cfg).eval()
    x = torch.randn(3, 5, 64) * 4 + 1
    scale, zero = q.act_quant.params(x)
    want = quantize(x, scale, zero, a_bits, sym=False)
    for backend in ops.available_backends():
        with ops.use_backend(backend):
            xq, xs, xz = q._quantize_input(x)
        assert torch.equal(xq, want) and torch.equal(xs, scale.expand(xs.shape))
        assert torch.equal(xz, zero.expand(xz.shape)), backend


_NO_FAST_W4A8 = "float: no fast w4a8_linear on cpu (backend auto)"


def test_auto_takes_the_float_path_where_only_an_emulating_reference_exists():
    w4 = _deployed(_linear(), LayerQuant(w_bits=4, w_group=32, a_bits=8)).eval()
    w8 = _deployed(_linear(), LayerQuant(w_bits=8, w_group=0, w_sym=True, a_bits=8, a_sym=True)).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        impl4 = ops.implementation("w4a8_linear", "cpu")  # the C++ kernel needs AVX2
        fast4 = impl4 != "reference"
        assert w4.kernel_for(x) == ("w4a8_linear" if fast4 else None)
        assert w8.kernel_for(x) == ("w8a8_linear" if ops.has_fast_impl("w8a8_linear", "cpu") else None)
        plan = kernel_plan(nn.Sequential(w4, w8))
        assert plan["0"] == (f"w4a8_linear [{impl4}]" if fast4 else _NO_FAST_W4A8)
        impl8 = ops.implementation("w8a8_linear", "cpu")
        no_fast8 = _NO_FAST_W4A8.replace("w4a8", "w8a8")
        assert plan["1"] == (f"w8a8_linear [{impl8}]" if impl8 != "reference" else no_fast8)
        cpu.set_isa("scalar")  # no fast w4a8_linear without AVX2: only the emulating reference
        try:
            assert w4.kernel_for(x) is None
            assert kernel_plan(nn.Sequential(w4, w8))["0"] == _NO_FAST_W4A8
        finally:
            cpu.set_isa(None)


def test_w4a8_groups_the_kernels_decline_keep_the_float_path():
    # both scales constant over 20 inputs: the kernels want whole blocks of 8, so the reference
    # (slower than float) would run; auto keeps the layer's float path instead
    q = _deployed(_linear(80), LayerQuant(w_bits=4, w_group=20, a_bits=8)).eval()
    x = torch.randn(3, 80)
    with torch.no_grad():
        assert q.kernel_op == "w4a8_linear" and q.kernel_implementation("cpu") == "reference"
        assert q.kernel_for(x) is None
        assert kernel_plan(nn.Sequential(q))["0"] == _NO_FAST_W4A8


def test_training_gradients_and_use_kernels_keep_the_fake_quant_path():
    cfg = LayerQuant(w_bits=8, w_group=0, w_sym=True, a_bits=8, a_sym=True)
    q = _deployed(_linear().train(), cfg)
    x = torch.randn(3, 64)
    ops.set_backend("reference")
    assert q.training and q.kernel_for(x) is None
    q.eval()
    assert q.kernel_for(x) is None  # the bias wants a gradient: the ops have no autograd
    y = q(x.requires_grad_())
    y.sum().backward()
    assert q.bias.grad is not None  # (the fake quantizer passes no gradient to x, as before)
    with torch.no_grad():
        assert q.kernel_for(x) == "w8a8_linear"
        assert set_kernels(nn.Sequential(q), False) == 1 and q.kernel_for(x) is None
        assert kernel_plan(nn.Sequential(q)) == {"0": "float: use_kernels is off"}
