"""ditq.quant.nn: QuantLinear bit-exact against the primitives, GPTQ overrides, int4-packed storage (either
layout loads into either storage), codes outside the bit width, the dequantized-weight cache, repr and
one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.kernels import ops, pack_int4
from ditq.quant import LayerQuant, QDiTConfig, QuantLinear
from ditq.quant.gptq import GPTQ
from ditq.quant.granularity import PerGroup, PerTensor, act_granularity, weight_granularity
from ditq.quant.primitives import dequantize, fake_quantize, quant_params, quantize
from ditq.quant.state import packed_state_dict


def _linear(in_f: int = 64, out_f: int = 24, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize(
    "w_bits, w_group, w_sym, a_bits, a_group, a_sym",
    [
        (4, 32, False, 8, 0, False),  # Q-DiT W4A8, g128-like
        (8, 0, False, 8, 16, False),  # per channel weights, token-group activations
        (3, 16, True, 6, -1, True),  # symmetric, per-tensor dynamic activations
        (4, 64, False, None, 0, False),  # weight-only
    ],
)
def test_forward_is_bit_exact_fake_quant(w_bits, w_group, w_sym, a_bits, a_group, a_sym):
    lin = _linear()
    cfg = LayerQuant(w_bits=w_bits, w_group=w_group, w_sym=w_sym, a_bits=a_bits, a_group=a_group, a_sym=a_sym)
    q = QuantLinear.from_float(lin, cfg)
    x = torch.randn(2, 5, 64)

    s, z = quant_params(lin.weight.detach(), w_bits, weight_granularity(w_group), w_sym)
    codes = quantize(lin.weight.detach(), s, z, w_bits, w_sym)
    w_ref = dequantize(codes, s, z)
    if a_bits is None:
        x_ref = x
    else:
        gran = PerTensor() if a_group == -1 else act_granularity(a_group)
        x_ref = fake_quantize(x, a_bits, gran, a_sym)
    ref = F.linear(x_ref, w_ref, lin.bias)

    assert torch.equal(q.qweight, codes) and q.qweight.dtype == (torch.int8 if w_sym else torch.uint8)
    assert torch.equal(q.w_scale, s) and torch.equal(q.w_zero, z)
    with torch.no_grad():
        assert torch.equal(q(x), ref)


def test_from_float_takes_a_qdit_config_and_keeps_bias_and_mode():
    lin = _linear(bias=False).train()
    q = QuantLinear.from_float(lin, QDiTConfig(w_group=32))
    assert q.bias is None and q.training
    assert q.w_scale.shape == (24, 2) and q.act_quant.bits == 8


def test_clip_choice_reaches_the_weights():
    lin = _linear()
    mse = QuantLinear.from_float(lin, LayerQuant(w_bits=3, w_group=16, w_clip="mse"))
    s, _ = quant_params(lin.weight.detach(), 3, PerGroup(16), clip="mse")
    assert torch.equal(mse.w_scale, s)


def test_gptq_result_as_weight_override():
    lin = _linear()
    acc = GPTQ(64)
    acc.add_batch(torch.randn(8, 64))
    res = acc.quantize(lin.weight.detach(), bits=4, granularity=PerGroup(32))
    q = QuantLinear.from_float(lin, LayerQuant(w_bits=4, w_group=32), res)
    assert torch.equal(q.qweight, res.codes)
    assert torch.equal(q.dequantized_weight(), res.weight)
    q2 = QuantLinear.from_float(lin, LayerQuant(w_bits=4, w_group=32), (res.codes, res.scale, res.zero))
    assert torch.equal(q2.qweight, q.qweight)


@pytest.mark.parametrize(
    "override, words",
    [
        (lambda r: (r.codes[:, :32], r.scale, r.zero), "codes for layer 'l' must be torch.uint8 (24, 64)"),
        (lambda r: (r.codes.to(torch.int8), r.scale, r.zero), "codes"),
        (lambda r: (r.codes, r.scale[:, :1], r.zero[:, :1]), "scale/zero for layer 'l' must be (24, 2)"),
        (lambda r: (r.codes + 16, r.scale, r.zero), "leave the 4-bit range [0, 15]"),
        (lambda r: 3, "GPTQResult or (codes, scale, zero)"),
    ],
)
def test_bad_weight_override_is_one_line(override, words):
    lin = _linear()
    res = GPTQ(64)
    res.add_batch(torch.randn(8, 64))
    res = res.quantize(lin.weight.detach(), bits=4, granularity=PerGroup(32))
    with pytest.raises(InvalidArgumentError) as e:
        QuantLinear.from_float(lin, LayerQuant(w_bits=4, w_group=32), override(res), layer="l")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_weight_cache_tracks_buffer_changes():
    q = QuantLinear.from_float(_linear(), LayerQuant(w_group=32))
    w1 = q.dequantized_weight()
    assert q.dequantized_weight() is w1  # cached
    q.w_scale.mul_(2)  # in-place write bumps the version
    assert torch.equal(q.dequantized_weight(), 2 * w1)
    q.load_state_dict({k: v.clone() for k, v in q.state_dict().items()} | {"w_scale": q.w_scale / 2})
    assert torch.equal(q.dequantized_weight(), w1)
    q.double()
    assert q.dequantized_weight().dtype == torch.float64
    q.cache_weight = False
    assert q.dequantized_weight() is not q.dequantized_weight()
    q.cache_weight = True
    q.invalidate_cache()
    assert q._cache is None
    assert torch.equal(q.weight, q.dequantized_weight())


def test_extra_repr_shows_bits_and_groups():
    q = QuantLinear.from_float(_linear(), LayerQuant(w_bits=4, w_group=32, a_bits=8, a_group=16))
    text = repr(q)
    assert "w_bits=4, w_group32" in text and "bits=8, token_group16" in text and "dynamic" in text
    s = QuantLinear.from_float(_linear(), LayerQuant(w_group=0, a_group=-1, dynamic=False))
    assert "w_channel" in repr(s) and "tensor" in repr(s) and "static" in repr(s)
    assert "bits=None" in repr(QuantLinear.from_float(_linear(), LayerQuant(w_group=0, a_bits=None)))


def test_group_size_errors_name_the_layer():
    with pytest.raises(InvalidArgumentError) as e:
        QuantLinear.from_float(_linear(), LayerQuant(w_group=48), layer="blocks.0.mlp.fc1")
    msg = str(e.value)
    assert "group size 48 does not divide the 64 input channels of layer 'blocks.0.mlp.fc1'" in msg
    assert "valid group sizes" in msg and "\n" not in msg
    with pytest.raises(InvalidArgumentError, match="does not divide the 64 channels"):
        QuantLinear.from_float(_linear(), LayerQuant(w_group=0, a_group=24))
    with pytest.raises(InvalidArgumentError, match="takes an nn.Linear"):
        QuantLinear.from_float(nn.Conv2d(3, 3, 1), LayerQuant())


@pytest.mark.parametrize("w_sym", [False, True])
def test_packed_storage_round_trips_and_loads_either_layout(w_sym):
    cfg = LayerQuant(w_bits=4, w_group=32, w_sym=w_sym, a_bits=8)
    q = QuantLinear.from_float(_linear(), cfg).eval()
    codes = q.qweight.clone()
    p = QuantLinear.from_float(_linear(), cfg).eval().pack_()
    assert p.packed and p.qweight.shape == (24, 32) and p.qweight.dtype == torch.uint8
    assert torch.equal(p.codes(), codes) and not p.cache_weight
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(p(x), q(x))  # the same codes: the same numbers on every path
        with ops.use_backend("reference"):
            assert torch.equal(p(x), q(x))
    # state dicts hold what the layer stores; either form loads into either storage
    assert p.state_dict()["qweight"].shape == (24, 32) and q.state_dict()["qweight"].shape == (24, 64)
    for src in (p.state_dict(), q.state_dict()):
        for packed in (False, True):
            dst = QuantLinear.empty(_linear(), cfg, packed=packed)
            dst.load_state_dict(src)
            assert dst.packed == packed and torch.equal(dst.codes(), codes)
    assert torch.equal(p.unpack_().qweight, codes) and not p.packed
    assert torch.equal(packed_state_dict(nn.Sequential(q))["0.qweight"], p.pack_().qweight)
    assert torch.equal(p.qweight, pack_int4((codes.short() + 8 * w_sym).to(torch.uint8)))
    wide = QuantLinear.from_float(_linear(), LayerQuant(w_bits=8, w_group=0)).pack_()
    assert not wide.packed and wide.qweight.shape == (24, 64)  # only <= 4 bits pack


def test_codes_outside_the_bit_width_are_a_checkpoint_error_naming_the_layer():
    cfg = LayerQuant(w_bits=4, w_group=32, a_bits=8)
    wide = QuantLinear.from_float(_linear(), LayerQuant(w_bits=8, w_group=32, a_bits=8)).state_dict()
    for packed in (False, True):
        dst = QuantLinear.empty(_linear(), cfg, layer="blocks.0.mlp.fc1", packed=packed)
        with pytest.raises(CheckpointError) as e:
            dst.load_state_dict(wide)
        msg = str(e.value)
        assert "layer 'blocks.0.mlp.fc1': qweight holds codes from 0 to 255" in msg
        assert "outside the 4-bit range [0, 15]" in msg and "\n" not in msg
