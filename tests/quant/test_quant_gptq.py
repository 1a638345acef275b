"""GPTQ: reduces to round-to-nearest without correlations, matches a float64 sequential (OBQ-style)
reference, beats round-to-nearest on correlated inputs, act-order, dead inputs, one-line errors."""

from __future__ import annotations

import pytest
import torch

from ditq.errors import InvalidArgumentError
from ditq.quant.gptq import GPTQ, gptq_quantize
from ditq.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from ditq.quant.primitives import dequantize, fake_quantize, gptq_quant_params, quantize


def _rtn(w, bits, gran, sym, params="gptq"):
    if params == "qdit":
        return fake_quantize(w, bits, gran, sym)
    s, z = gptq_quant_params(w, bits, gran, sym)
    return dequantize(quantize(w, s, z, bits, sym), s, z)


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated channels (a random low-rank mix plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d // 4, d, generator=g)
    return torch.randn(n, d // 4, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("params", ["gptq", "qdit"])
@pytest.mark.parametrize("gran", [PerChannel(), PerGroup(16), PerTensor()])
@pytest.mark.parametrize("sym", [False, True])
def test_identity_hessian_is_round_to_nearest(params, gran, sym):
    w = torch.randn(12, 64)
    res = gptq_quantize(w, torch.eye(64), 4, gran, sym, params=params)
    assert torch.equal(res.weight, _rtn(w, 4, gran, sym, params))
    assert torch.equal(dequantize(res.codes, res.scale, res.zero), res.weight)
    assert res.codes.dtype == (torch.int8 if sym else torch.uint8)


def _obq_reference(w, H, bits, sym, percdamp=0.01):
    """Sequential optimal-brain-quantization in float64: quantize one column, push its error onto
    the rest through the inverse Hessian, eliminate that column from the inverse."""
    W = w.double().clone()
    H = H.double().clone()
    H += percdamp * H.diag().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    s, z = (t.double() for t in gptq_quant_params(w, bits, PerChannel(), sym))
    q_min, q_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    codes = torch.zeros_like(W)
    for j in range(W.shape[1]):
        c = torch.clamp(torch.round(W[:, j : j + 1] / s) + z, q_min, q_max)
        codes[:, j] = c.flatten()
        err = (W[:, j] - ((c - z) * s).flatten()) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("block_size", [128, 16])
def test_matches_float64_sequential_reference(sym, block_size):
    x = _correlated(256, 64, seed=1)
    w = torch.randn(32, 64)
    acc = GPTQ(64)
    acc.add_batch(x[None])
    res = acc.quantize(w, 4, PerChannel(), sym, block_size=block_size)
    ref = _obq_reference(w, acc.H, 4, sym)
    agree = (res.codes.double() == ref).double().mean().item()
    assert agree >= 0.99, agree  # float32 vs float64: at most a few rounding flips


@pytest.mark.parametrize("gran", [PerChannel(), PerGroup(16)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_lowers_output_error_vs_round_to_nearest(gran, sym, act_order):
    d, out = 64, 32
    x_cal, x_test = _correlated(768, d, seed=2).split([512, 256])  # one distribution, held-out test
    w = torch.randn(out, d) * 0.1
    acc = GPTQ(d)
    for chunk in x_cal.split(64):
        acc.add_batch(chunk)
    res = acc.quantize(w, 4, gran, sym, act_order=act_order, block_size=32)
    ref = x_test @ w.t()
    err_gptq = (ref - x_test @ res.weight.t()).norm()
    err_rtn = (ref - x_test @ _rtn(w, 4, gran, sym).t()).norm()
    assert err_gptq < 0.7 * err_rtn, (err_gptq.item(), err_rtn.item())
    assert torch.equal(dequantize(res.codes, res.scale, res.zero), res.weight)


def test_act_order_keeps_the_plain_group_layout():
    """With act-order, group parameters are fixed from the original weight, groups stay consecutive."""
    w = torch.randn(16, 64)
    acc = GPTQ(64)
    acc.add_batch(_correlated(128, 64, seed=4) * torch.linspace(0.1, 2, 64))
    res = acc.quantize(w, 4, PerGroup(16), act_order=True)
    s, z = gptq_quant_params(w, 4, PerGroup(16))
    assert torch.equal(res.scale, s) and torch.equal(res.zero, z)
    assert res.scale.shape == (16, 4)


def test_dead_inputs_zero_their_weights():
    x = torch.randn(100, 32)
    x[:, 5] = 0.0
    acc = GPTQ(32)
    acc.add_batch(x)
    w = torch.randn(8, 32)
    for sym in (False, True):
        res = acc.quantize(w, 4, PerGroup(8), sym)
        assert not res.weight[:, 5].any()


def test_hessian_running_mean_and_dtypes():
    x = torch.randn(4, 10, 16)
    a, b = GPTQ(16), GPTQ(16)
    for xi in x:
        a.add_batch(xi)  # 2-D input: one sample
    b.add_batch(x)  # 3-D input: 4 samples
    assert a.nsamples == b.nsamples == 4
    expected = 2 / 4 * torch.einsum("bnc,bnd->cd", x, x)
    assert torch.allclose(a.H, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.H, expected, rtol=1e-5, atol=1e-5)
    res = b.quantize(torch.randn(8, 16).half(), 8)
    assert res.weight.dtype == torch.float16 and res.scale.dtype == torch.float32


def _one_line(excinfo) -> None:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg


def _acc():
    acc = GPTQ(16)
    acc.add_batch(torch.randn(20, 16))
    return acc


W = torch.randn(8, 16)
BAD = {
    "in_features 0": lambda: GPTQ(0),
    "in_features float": lambda: GPTQ(16.0),
    "feature mismatch": lambda: GPTQ(16).add_batch(torch.randn(4, 15)),
    "int input": lambda: GPTQ(16).add_batch(torch.ones(4, 16, dtype=torch.long)),
    "nan input": lambda: GPTQ(2).add_batch(torch.tensor([[1.0, float("nan")]])),
    "no data": lambda: GPTQ(16).quantize(W, 4),
    "3-D weight": lambda: _acc().quantize(W[None], 4),
    "weight columns": lambda: _acc().quantize(torch.randn(8, 12), 4),
    "hessian shape": lambda: gptq_quantize(W, torch.eye(15), 4),
    "hessian type": lambda: gptq_quantize(W, None, 4),
    "hessian nan": lambda: gptq_quantize(W, torch.full((16, 16), float("nan")), 4),
    "weight nan": lambda: gptq_quantize(torch.full((8, 16), float("nan")), torch.eye(16), 4),
    "bits": lambda: _acc().quantize(W, 10),
    "group": lambda: _acc().quantize(W, 4, PerGroup(5)),
    "activation granularity": lambda: _acc().quantize(W, 4, PerToken()),
    "block size": lambda: _acc().quantize(W, 4, block_size=0),
    "percdamp": lambda: _acc().quantize(W, 4, percdamp=0.0),
    "params": lambda: _acc().quantize(W, 4, params="awq"),
    "gptq rule with mse": lambda: _acc().quantize(W, 4, clip="mse"),
    "not positive definite": lambda: gptq_quantize(W, -torch.eye(16), 4),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_one_line_error(name):
    with pytest.raises(InvalidArgumentError) as e:
        BAD[name]()
    _one_line(e)
