"""ditq.quant.ternary.layers: ternarization (TerDiT / BitNet b1.58), straight-through gradients, int8
activations, alpha init; packed TernaryLinear: 2 bits per weight, the official layout loaded, its
kernels against the float path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ditq.errors import CheckpointError, InvalidArgumentError
from ditq.kernels import ops
from ditq.kernels.packing import pack_2bit, pack_ternary
from ditq.models import LargeDiT, LargeDiTConfig
from ditq.quant import (
    TernaryLinear,
    TernaryQATConfig,
    TernaryQATLinear,
    model_size_bytes,
    quantize_,
    set_kernels,
    ternary_layers,
)
from ditq.quant.ternary import empty_ternary_, fake_quant_act_int8, init_alpha, ternarize

TINY = LargeDiTConfig(dim=64, n_layers=2, n_heads=4, input_size=8, num_classes=10, adaln_norm=True)


def _large_dit(seed: int = 0) -> LargeDiT:
    """A tiny Large-DiT with every weight random (adaLN-Zero would hide the blocks)."""
    torch.manual_seed(seed)
    model = LargeDiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _inputs(batch: int = 3):
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([0, 400, 999][:batch]),
        torch.tensor([1, 5, 10][:batch]),
    )


#################################################################################
#                        Ternarization and the quantizers                       #
#################################################################################


def test_ternarize_absmean_by_hand():
    w = torch.tensor([[0.1, -0.5, 2.0, 0.0], [0.3, -0.05, -3.0, 0.25]])
    w_t, gamma = ternarize(w)
    assert gamma.item() == pytest.approx(6.2 / 8)  # mean |W| over the whole tensor
    # W / 0.775 = [[0.13, -0.65, 2.58, 0], [0.39, -0.06, -3.87, 0.32]] -> round, clamp to [-1, 1]
    assert w_t.tolist() == [[0, -1, 1, 0], [0, 0, -1, 0]]
    # γ = 1: values clamp at ±1, and |W| just under / over γ/2 rounds to 0 / ±1.
    w_t, gamma = ternarize(torch.tensor([[2.0, 0.49, -0.51, 0.5, 1.0, -2.5, 0.0, 1.0]]))
    assert gamma.item() == 1.0
    assert w_t.tolist() == [[1, 0, -1, 0, 1, -1, 0, 1]]  # 0.5/(1+1e-6) < 0.5 rounds to 0
    assert w_t.dtype == torch.float32
    zero_t, zero_gamma = ternarize(torch.zeros(3, 4))
    assert zero_gamma == 0 and torch.equal(zero_t, torch.zeros(3, 4))


def test_fake_quant_act_int8_per_token_absmax():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-4.0, 1.0, 3.0, 2.0]])
    q = fake_quant_act_int8(x)
    # Row 0: s = 127; x*s = 127, -63.5, 31.75, 0 -> 127, -64 (half to even), 32, 0.
    assert torch.equal(q[0], torch.tensor([127.0, -64.0, 32.0, 0.0]) / 127.0)
    assert torch.equal(q[1], torch.zeros(4))  # an all-zero token stays zero (max clamped to 1e-5)
    s = 127.0 / 4.0  # row 2 has its own scale
    assert torch.equal(q[2], (x[2] * s).round() / s)
    assert (q - x).abs().max() <= 0.5 * 4.0 / 127 + 1e-7


def test_straight_through_gradients_vs_finite_differences():
    torch.manual_seed(0)
    w0 = torch.randn(6, 8, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    target = torch.randn(5, 6, dtype=torch.float64)
    for scale in ("alpha", "gamma"):
        layer = TernaryQATLinear.from_float(
            _linear(w0.clone(), torch.randn(6, dtype=torch.float64)), scale=scale, alpha_init="lsq"
        )
        loss = ((layer(x) - target) ** 2).sum()
        loss.backward()
        w_eff = layer.effective_weight().detach()

        def loss_of_effective(we: torch.Tensor, layer=layer) -> torch.Tensor:
            return ((nn.functional.linear(x, we, layer.bias.detach()) - target) ** 2).sum()

        # G = dL/dW_eff by central differences (the loss is smooth in W_eff).
        G = torch.zeros_like(w_eff)
        h = 1e-6
        for idx in [(0, 0), (2, 5), (5, 7), (3, 1)]:
            e = torch.zeros_like(w_eff)
            e[idx] = h
            G[idx] = (loss_of_effective(w_eff + e) - loss_of_effective(w_eff - e)) / (2 * h)
            factor = (
                layer.alphas.item() if scale == "alpha" else 1.0
            )  # dL/dW = alpha*G or G (straight through)
            assert layer.weight.grad[idx].item() == pytest.approx(factor * G[idx].item(), rel=1e-6, abs=1e-9)
        if scale == "alpha":
            # The loss is exactly quadratic in alpha (W̃ does not depend on it): finite differences are exact.
            a = layer.alphas.detach().clone()
            w_t, _ = ternarize(layer.weight)

            def loss_of_alpha(alpha: float, layer=layer, w_t=w_t) -> torch.Tensor:
                return loss_of_effective(alpha * w_t)

            fd = (loss_of_alpha(a.item() + 1e-6) - loss_of_alpha(a.item() - 1e-6)) / 2e-6
            assert layer.alphas.grad.item() == pytest.approx(fd.item(), rel=1e-6)
        else:
            assert layer.alphas is None


def test_activation_quant_gradient_is_straight_through():
    torch.manual_seed(1)
    layer = TernaryQATLinear(8, 4, bias=False, scale="gamma", act_bits=8)
    x = torch.randn(3, 8, requires_grad=True)
    gy = torch.randn(3, 4)
    y = layer(x)
    y.backward(gy)
    torch.testing.assert_close(x.grad, gy @ layer.effective_weight().detach())
    # The forward did quantize: it differs from the float-input result.
    with torch.no_grad():
        y_float = nn.functional.linear(x, layer.effective_weight())
    assert (y - y_float).abs().max() > 0
    torch.testing.assert_close(y, nn.functional.linear(fake_quant_act_int8(x), layer.effective_weight()))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def test_alpha_init_methods():
    torch.manual_seed(2)
    w = torch.randn(64, 128) * 0.02
    w_t, gamma = ternarize(w)
    lsq = init_alpha(w, "lsq")
    kept = w_t != 0
    assert lsq.shape == (1,)
    torch.testing.assert_close(lsq[0], w.abs()[kept].mean())  # LS scale = mean |W| over kept entries
    assert init_alpha(w, "gamma").item() == pytest.approx(gamma.item())
    assert lsq.item() > gamma.item()
    # Least squares is the best scalar: lower weight error than gamma, and lower output error for isotropic x.
    err = {m: (w - init_alpha(w, m) * w_t).norm().item() for m in ("lsq", "gamma")}
    assert err["lsq"] < err["gamma"]
    x = torch.randn(4096, 128)
    out = {m: (x @ (w - init_alpha(w, m) * w_t).T).pow(2).mean().item() for m in ("lsq", "gamma")}
    assert out["lsq"] < out["gamma"]
    assert 1.2 < lsq.item() / gamma.item() < 1.45  # ≈ 1.34 for Gaussian weights
    torch.manual_seed(3)
    normal = init_alpha(w, "normal")
    torch.manual_seed(3)
    assert normal.item() == torch.randn(1).item()  # the original's N(0, 1)
    zero = torch.zeros(8, 16)
    assert init_alpha(zero, "lsq").item() == pytest.approx(1 / math.sqrt(16))  # adaLN-Zero stays trainable
    assert init_alpha(zero, "gamma").item() == pytest.approx(1 / math.sqrt(16))
    with pytest.raises(InvalidArgumentError, match="alpha_init"):
        init_alpha(w, "ones")
    with pytest.raises(InvalidArgumentError, match="meta device"):
        init_alpha(torch.empty(4, 4, device="meta"))


def test_ternary_outputs_differ_from_float_and_track_it():
    """The QAT model really is ternary, and with the LS init it stays close to the float model."""
    model = _large_dit()
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model.eval()(x, t, y)
    quantize_(model, TernaryQATConfig())
    with torch.no_grad():
        out = model.eval()(x, t, y)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < 0.9


#################################################################################
#                             Packed TernaryLinear                              #
#################################################################################


def test_packed_weights_hold_two_bits_per_weight():
    model = _large_dit()
    float_bytes = model_size_bytes(model)
    quantize_(model, TernaryQATConfig())
    quantize_(model, TernaryQATConfig(step="convert"))
    ternary_weights = 0
    for name, layer in ternary_layers(model).items():
        assert layer.weight.dtype == torch.uint8
        assert layer.weight.numel() * 8 <= 2 * layer.in_features * layer.out_features, name
        assert layer.weight.shape == (layer.out_features, layer.in_features // 4)
        ternary_weights += layer.in_features * layer.out_features
    saved = float_bytes - model_size_bytes(model)
    # fp32 -> 2 bits per weight, plus one fp32 alpha per layer (16 layers).
    assert saved == ternary_weights * 4 - ternary_weights // 4 - 16 * 4


def test_empty_ternary_loads_official_layout_and_rejects_code_3():
    torch.manual_seed(4)
    lin = nn.Linear(16, 8)
    w_t = torch.randint(-1, 2, (8, 16), dtype=torch.int8)
    alphas = torch.tensor([0.3])
    official = {"alphas": alphas, "bias": lin.bias.detach(), "weight": pack_ternary(w_t, "terdit")}
    holder = nn.Sequential(lin)
    empty_ternary_(holder, TernaryQATConfig(preset=None))
    layer = holder[0]
    assert isinstance(layer, TernaryLinear) and layer.weight.shape == (8, 4)
    layer.load_state_dict(official)
    assert torch.equal(layer.ternary_weight(), w_t)
    assert torch.equal(layer.weight, pack_ternary(w_t, "k4"))
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), x @ (0.3 * w_t.float()).T + lin.bias)
    # Its own (k4) state dict loads back too.
    again = TernaryLinear(16, 8)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(x), layer(x))
    bad = dict(official, weight=pack_2bit(torch.full((8, 16), 3, dtype=torch.uint8), "terdit"))
    with pytest.raises(CheckpointError, match="code 3"):
        layer.load_state_dict(bad)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()


def _ternary(act_bits) -> nn.Module:
    model = _tiny()
    quantize_(model, TernaryQATConfig(act_bits=act_bits, preset=None))
    quantize_(model, TernaryQATConfig(step="convert", preset=None))
    return model.eval()


@pytest.mark.parametrize("act_bits, op", [(8, "w158a8_linear"), (None, "ternary_linear")])
def test_ternary_layers_run_their_op_and_match_the_float_path(act_bits, op):
    model = _ternary(act_bits)
    layer = model[0]
    assert isinstance(layer, TernaryLinear) and layer.kernel_op == op
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        set_kernels(model, False)
        want = model(x)
        set_kernels(model, True)
        for backend in ops.available_backends():
            with ops.use_backend(backend):
                assert layer.kernel_for(x) == op
                got = model(x)
            if op == "ternary_linear" and backend == "reference":
                assert torch.equal(got, want)  # weight-only: the same float operations
            else:
                assert _rel(got, want) < 1e-5
        auto = layer.kernel_for(x)
        assert auto == (op if ops.has_fast_impl(op, "cpu") else None)
    layer.train()
    assert layer.kernel_for(x) is None
