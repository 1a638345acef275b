"""ditq.quant.act_quant: ActQuantizer's dynamic scales follow each sample and call; static ranges (per tensor,
per channel) calibrate, then freeze, and load from a state dict as calibrated."""

from __future__ import annotations

import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.quant.act_quant import ActQuantizer
from ditq.quant.granularity import PerTensor, act_granularity
from ditq.quant.primitives import fake_quantize


def test_dynamic_scales_follow_each_sample_and_call():
    aq = ActQuantizer(8, 0)
    x = torch.randn(2, 5, 16)
    x2 = x.clone()
    x2[0] *= 10  # sample 0 (e.g. another timestep) has a 10x range
    s1, _ = aq.params(x)
    s2, _ = aq.params(x2)
    assert s1.shape == (2, 5, 1)
    assert torch.allclose(s2[0], 10 * s1[0]) and torch.equal(s2[1], s1[1])  # per sample, per token
    assert len(aq.state_dict()) == 0  # no state: nothing carries over between calls
    assert torch.equal(aq(x2)[1], aq(x)[1])
    grouped = ActQuantizer(8, 4).params(x)[0]
    assert grouped.shape == (2, 5, 4)


def test_static_per_tensor_calibrates_then_freezes():
    aq = ActQuantizer(8, -1, dynamic=False, channels=16, layer="blocks.0.attn.qkv")
    x1, x2 = torch.randn(3, 16), 5 * torch.randn(3, 16)
    with pytest.raises(InvalidArgumentError, match="layer 'blocks.0.attn.qkv' has no calibrated range"):
        aq(x1)
    aq.calibrating = True
    assert torch.equal(aq(x1), x1)  # passes through while observing
    aq.calibrating = False
    assert torch.equal(aq(x1), fake_quantize(x1, 8, PerTensor()))
    lo, hi = aq.lo.clone(), aq.hi.clone()
    out2 = aq(x2)
    assert torch.equal(aq.lo, lo) and torch.equal(aq.hi, hi)  # frozen
    assert not torch.equal(out2, fake_quantize(x2, 8, PerTensor()))  # unlike a dynamic range
    step = float(hi - lo) / 255  # the grid ends within one step of the calibrated range (zero is rounded)
    assert float(out2.max()) <= float(hi) + step and float(out2.min()) >= float(lo) - step
    assert float(x2.abs().max()) > 2 * float(hi.abs().max() + lo.abs().max())  # so x2 really was clipped


def test_static_per_channel_ranges():
    aq = ActQuantizer(8, 1, dynamic=False, channels=16)  # a_group 1: one range per channel
    x = torch.randn(2, 3, 16) * torch.linspace(0.1, 10, 16)
    aq.calibrating = True
    aq(x[:1])
    aq(x[1:])  # running min/max over both calls
    aq.calibrating = False
    assert aq.lo.shape == (16,)
    assert torch.equal(aq.lo, x.reshape(-1, 16).amin(0)) and torch.equal(aq.hi, x.reshape(-1, 16).amax(0))
    cols = x.reshape(-1, 16).t().contiguous()  # each channel as one row
    ref = fake_quantize(cols, 8, act_granularity(0)).t().reshape(x.shape)
    assert torch.equal(aq(x), ref)


def test_static_ranges_load_as_calibrated():
    a = ActQuantizer(8, 0, dynamic=False, channels=8)
    a.calibrating = True
    a(torch.randn(4, 8))
    a.calibrating = False
    b = ActQuantizer(8, 0, dynamic=False, channels=8)
    assert not b.calibrated
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 8)
    assert b.calibrated and torch.equal(b(x), a(x))
