"""quant_params / quantize / dequantize / fake_quantize: float64 reference, error bounds, codes,
dynamic activation parameters, clipping, GPTQ's range rule, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken, PerTokenGroup
from ditq.quant.primitives import (
    MSE,
    MinMax,
    Percentile,
    dequantize,
    fake_quantize,
    gptq_quant_params,
    qrange,
    quant_params,
    quantize,
)

GRANS = [PerTensor(), PerChannel(), PerGroup(8), PerToken(), PerTokenGroup(16)]


def _reference(x: torch.Tensor, bits: int, g: int | None, sym: bool) -> torch.Tensor:
    """Q-DiT's min-max rule, one group at a time in Python floats (IEEE double, round half to even)."""
    flat = x.reshape(1, -1) if g is None else x.reshape(-1, g)
    out = []
    for row in flat.tolist():
        if sym:
            q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            s, z = max(max(abs(v) for v in row), 1e-5) / q_max, 0.0
        else:
            q_min, q_max = 0, 2**bits - 1
            s = max(max(row) - min(row), 1e-5) / q_max
            z = float(min(max(round(-min(row) / s), q_min), q_max))
        out.append([(min(max(round(v / s) + z, q_min), q_max) - z) * s for v in row])
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gran,g", [(PerTensor(), None), (PerChannel(), 32), (PerGroup(8), 8)])
def test_float64_matches_scalar_reference(bits, sym, gran, g):
    x = torch.randn(6, 32, dtype=torch.float64) * torch.linspace(0.1, 3.0, 6, dtype=torch.float64)[:, None]
    x[0, :8] = 0.0  # a zero group
    x[1, 8:16] = torch.linspace(1, 2, 8, dtype=torch.float64)  # a group above 0
    assert torch.equal(fake_quantize(x, bits, gran, sym), _reference(x, bits, g, sym))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_at_most_half_a_step_inside_the_range(sym, bits):
    x = torch.randn(4, 10, 64, dtype=torch.float64)  # every group holds both signs
    for gran in (PerToken(), PerTokenGroup(16)):
        scale, zero = quant_params(x, bits, gran, sym)
        err = (fake_quantize(x, bits, gran, sym) - x).abs()
        step = scale.repeat_interleave(64 // scale.shape[-1], dim=-1)
        assert bool((err <= step / 2 * (1 + 1e-12)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("clip", ["max", "mse", "percentile", 0.9])
def test_dequantize_of_codes_equals_fake_quantize(dtype, sym, clip):
    x = (torch.randn(3, 5, 32) * 2).to(dtype)
    for gran in GRANS:
        bits = 4
        scale, zero = quant_params(x, bits, gran, sym, clip)
        assert scale.dtype == zero.dtype == dtype
        q = quantize(x, scale, zero, bits, sym)
        out = dequantize(q, scale, zero)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, fake_quantize(x, bits, gran, sym, clip)), (gran, clip)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_dtype_and_range(bits, sym):
    x = torch.randn(8, 64) * 5
    scale, zero = quant_params(x, bits, PerGroup(16), sym)
    q = quantize(x, scale, zero, bits, sym)
    q_min, q_max = qrange(bits, sym)
    assert q.dtype == (torch.int8 if sym else torch.uint8)
    assert int(q.min()) >= q_min and int(q.max()) <= q_max
    assert int(q.min()) == q_min or int(q.max()) == q_max  # min-max uses the whole grid
    assert torch.equal(zero, zero.round()) and bool(((zero >= q_min) & (zero <= q_max)).all())
    if sym:
        assert not zero.any()


def test_parameter_shapes():
    w = torch.randn(48, 96)
    assert quant_params(w, 4, PerChannel())[0].shape == (48, 1)
    assert quant_params(w, 4, PerGroup(32))[0].shape == (48, 3)
    assert quant_params(w, 4, PerTensor())[0].shape == (1, 1)
    x = torch.randn(2, 5, 96)
    assert quant_params(x, 8, PerToken())[0].shape == (2, 5, 1)
    assert quant_params(x, 8, PerTokenGroup(32))[0].shape == (2, 5, 3)
    assert quant_params(x, 8, "token_group32")[0].shape == (2, 5, 3)  # str form accepted


def test_dynamic_activation_parameters_follow_the_input():
    x = torch.randn(2, 7, 64)
    y = x.clone()
    y[1, 3] *= 100  # one token with a wider range
    sx, _ = quant_params(x, 8, PerToken())
    sy, _ = quant_params(y, 8, PerToken())
    assert not torch.equal(sx[1, 3], sy[1, 3]) and sy[1, 3] > 50 * sx[1, 3]
    mask = torch.ones(2, 7, 1, dtype=torch.bool)
    mask[1, 3] = False
    assert torch.equal(sx[mask], sy[mask])  # the other tokens are untouched
    # Scaling the input by a power of two scales everything exactly (no calibration, no state).
    assert torch.equal(fake_quantize(4 * x, 8, PerTokenGroup(16)), 4 * fake_quantize(x, 8, PerTokenGroup(16)))


def test_mse_clip_never_worse_than_minmax():
    w = torch.randn(16, 64)
    w[:, 0] *= 8  # outliers make shrinking worthwhile
    for sym in (False, True):
        for gran in (PerChannel(), PerGroup(16)):
            n = 64 // (16 if isinstance(gran, PerGroup) else 64)
            err = {
                c: (fake_quantize(w, 3, gran, sym, c) - w).abs().pow(2.4).reshape(16, n, -1).mean(-1)
                for c in ("max", "mse")
            }
            assert bool((err["mse"] <= err["max"]).all())
            assert bool((err["mse"] < err["max"]).any())
            s_mse, _ = quant_params(w, 3, gran, sym, "mse")
            s_max, _ = quant_params(w, 3, gran, sym, "max")
            assert bool((s_mse <= s_max * (1 + 1e-6)).all())


def test_mse_schedule_is_q_dit_grid():
    """The best factor is one of 1 - 0.001 i, i < 100: scale ratio within [0.901, 1]."""
    w = torch.randn(32, 64)
    s_mse, _ = quant_params(w, 4, PerChannel(), True, MSE())
    s_max, _ = quant_params(w, 4, PerChannel(), True, "max")
    r = (s_mse / s_max).flatten()
    assert bool((r >= 0.901 - 1e-6).all()) and bool((r <= 1 + 1e-6).all())
    assert torch.allclose(r * 1000, (r * 1000).round(), atol=1e-2)


def test_percentile_clip():
    x = torch.randn(4, 1000)
    for sym in (False, True):
        full = quant_params(x, 8, PerToken(), sym, Percentile(100))
        mm = quant_params(x, 8, PerToken(), sym, "max")
        assert torch.equal(full[0], mm[0]) and torch.equal(full[1], mm[1])
    x[:, 0] = 1000.0  # one outlier per token
    s_pct, _ = quant_params(x, 8, PerToken(), True, Percentile(99.0))
    s_max, _ = quant_params(x, 8, PerToken(), True, "max")
    assert bool((s_pct < s_max / 100).all())
    out = fake_quantize(x, 8, PerToken(), True, Percentile(99.0))
    assert bool((out[:, 0] < 10).all())  # the outlier is clipped


def test_minmax_ratio_shrinks_scale():
    w = torch.randn(8, 32)
    s1, _ = quant_params(w, 4, PerChannel(), True, 1.0)
    s9, _ = quant_params(w, 4, PerChannel(), True, MinMax(0.9))
    assert torch.allclose(s9, s1 * 0.9)


def test_gptq_rule_properties():
    w = torch.randn(6, 16)
    w[0] = w[0].abs() + 0.1  # no negative value
    w[1] = 0.0
    s, z = gptq_quant_params(w, 4, PerChannel(), sym=False)
    assert torch.equal(z, z.round())
    assert bool(((z >= 0) & (z <= 15)).all())
    assert z[0].item() == 0  # range [0, max]: zero at code 0
    assert torch.allclose(s[1], torch.tensor([2 / 15]))  # all zero -> [-1, 1]
    s, z = gptq_quant_params(w, 4, PerChannel(), sym=True)
    assert not z.any()
    assert torch.allclose(s[2], 2 * w[2].abs().max() / 15)
    assert torch.allclose(s[0], w[0].max() / 15)  # GPTQ's quirk: a non-negative row keeps [0, max]


def _one_line(excinfo) -> None:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg


X = torch.randn(4, 96)
S, Z = quant_params(X, 4, PerGroup(32))

BAD = {
    "bits 1": lambda: quant_params(X, 1, PerChannel()),
    "bits 9": lambda: fake_quantize(X, 9, PerChannel()),
    "bits float": lambda: quantize(X, S, Z, 4.0),
    "group 40": lambda: quant_params(X, 4, PerGroup(40)),
    "token group 5": lambda: fake_quantize(X, 8, PerTokenGroup(5)),
    "granularity str": lambda: quant_params(X, 4, "rows"),
    "granularity None": lambda: quant_params(X, 4, None),
    "clip name": lambda: quant_params(X, 4, PerChannel(), clip="entropy"),
    "clip ratio 0": lambda: quant_params(X, 4, PerChannel(), clip=0.0),
    "clip ratio 1.5": lambda: MinMax(1.5),
    "clip type": lambda: quant_params(X, 4, PerChannel(), clip=None),
    "mse p": lambda: MSE(p=0),
    "mse steps": lambda: MSE(steps=0),
    "mse shrink": lambda: MSE(shrink=0.02),
    "percentile 50": lambda: Percentile(50),
    "percentile 101": lambda: Percentile(101),
    "int input": lambda: quant_params(torch.ones(4, 8, dtype=torch.int32), 4, PerChannel()),
    "not a tensor": lambda: quant_params([1.0, 2.0], 4, PerChannel()),
    "0-dim": lambda: quant_params(torch.tensor(1.0), 4, PerTensor()),
    "empty": lambda: quant_params(torch.empty(0, 8), 4, PerChannel()),
    "nan": lambda: quant_params(torch.tensor([[1.0, float("nan")]]), 4, PerChannel()),
    "inf": lambda: fake_quantize(torch.tensor([[1.0, float("inf")]]), 4, PerToken()),
    "gptq nan": lambda: gptq_quant_params(torch.tensor([[1.0, float("nan")]]), 4, PerChannel()),
    "gptq ratio": lambda: gptq_quant_params(X, 4, PerChannel(), clip_ratio=2.0),
    "scale groups": lambda: quantize(X, torch.ones(4, 5), torch.zeros(4, 5), 4),
    "scale rows": lambda: quantize(X, S[:3], Z[:3], 4),
    "scale ndim": lambda: quantize(X, S[0], Z[0], 4),
    "zero shape": lambda: quantize(X, S, Z[:, :1], 4),
    "scale not tensor": lambda: quantize(X, 0.1, 0.0, 4),
    "float codes": lambda: dequantize(X, S, Z),
    "codes list": lambda: dequantize([1, 2], S, Z),
    "codes 0-dim": lambda: dequantize(torch.tensor(3, dtype=torch.uint8), S, Z),
    "int scale": lambda: dequantize(torch.zeros(4, 96, dtype=torch.uint8), S.int(), Z),
    "codes vs scale": lambda: dequantize(torch.zeros(4, 95, dtype=torch.uint8), S, Z),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_one_line_error(name):
    with pytest.raises(InvalidArgumentError) as e:
        BAD[name]()
    _one_line(e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gran", ["token", "token_group16", "tensor"])
def test_fake_quantize_is_bit_identical_to_quantize_then_dequantize(dtype, sym, gran):
    from ditq.quant.granularity import parse_granularity

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=g) * torch.logspace(-2, 2, 64)).to(dtype)
    granularity = parse_granularity(gran)
    for bits in (2, 4, 8):
        s, z = quant_params(x, bits, granularity, sym)
        slow = dequantize(quantize(x, s, z, bits, sym), s, z)
        fast = fake_quantize(x, bits, granularity, sym)
        assert fast.dtype == x.dtype and torch.equal(fast, slow)
