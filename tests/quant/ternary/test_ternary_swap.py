"""ditq.quant.ternary.swap: prepare -> train -> convert through quantize_ is exact; which layers are swapped
(presets, include/exclude, adaLN); one-line errors that leave the model unchanged; the Q-DiT path is
untouched; swapped-in layers keep the mode of the layers they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.models import DiT, DiTConfig, LargeDiT, LargeDiTConfig
from ditq.quant import (
    QDiTConfig,
    QuantLinear,
    TernaryLinear,
    TernaryQATConfig,
    TernaryQATLinear,
    quantize_,
    set_kernels,
    ternary_layers,
)
from ditq.quant.ternary import empty_ternary_, select_ternary_layers

TINY = LargeDiTConfig(dim=64, n_layers=2, n_heads=4, input_size=8, num_classes=10, adaln_norm=True)


PER_LAYER = (
    [f"attention.w{c}" for c in "qkvo"] + [f"feed_forward.w{c}" for c in "123"] + ["adaLN_modulation.1"]
)


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


@pytest.mark.parametrize("scale, act_bits", [("alpha", None), ("gamma", None), ("alpha", 8)])
def test_prepare_train_convert_is_exact(scale, act_bits):
    model = _large_dit()
    x, t, y = _inputs()
    quantize_(model, TernaryQATConfig(step="prepare", scale=scale, act_bits=act_bits))
    names = list(ternary_layers(model))
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in PER_LAYER]
    assert all(isinstance(m, TernaryQATLinear) for m in ternary_layers(model).values())
    assert isinstance(model.x_embedder, nn.Linear) and isinstance(model.final_layer.linear, nn.Linear)
    assert ("layers.0.attention.wq.alphas" in model.state_dict()) == (scale == "alpha")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for _ in range(3):
        loss = model(x, t, y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "layers.0.attention.wq.weight" in changed
    assert ("layers.1.feed_forward.w2.alphas" in changed) == (scale == "alpha")

    model.eval()
    with torch.no_grad():
        qat_out = model(x, t, y)
        cfg_qat = model.forward_with_cfg(
            x[:2].repeat(2, 1, 1, 1), t[:1].repeat(4), torch.tensor([1, 2, 10, 10]), 4.0
        )
    quantize_(model, TernaryQATConfig(step="convert"))
    assert all(isinstance(m, TernaryLinear) for m in ternary_layers(model).values())
    assert len(ternary_layers(model)) == 16
    assert not model.layers[0].attention.wq.training  # converted in eval mode: eval layers
    set_kernels(model, False)  # the float path: exactly the QAT model's numbers
    with torch.no_grad():
        assert torch.equal(model(x, t, y), qat_out)
        cfg = model.forward_with_cfg(
            x[:2].repeat(2, 1, 1, 1), t[:1].repeat(4), torch.tensor([1, 2, 10, 10]), 4.0
        )
        assert torch.equal(cfg, cfg_qat)
    set_kernels(model, True)  # the integer ops: the same up to float rounding of the epilogue
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), qat_out, rtol=1e-4, atol=1e-5)
    assert model.layers[0].attention.wq.act_bits == act_bits


def test_dit_preset_includes_adaln_and_keeps_embedders():
    torch.manual_seed(0)
    model = DiT(
        DiTConfig(depth=2, hidden_size=64, num_heads=4, input_size=8, num_classes=10, adaln_norm=True)
    )
    names = select_ternary_layers(model, TernaryQATConfig())
    assert names == [
        f"blocks.{i}.{n}"
        for i in range(2)
        for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    ]
    assert select_ternary_layers(model, TernaryQATConfig(quantize_adaln=False))[-1] == "blocks.1.mlp.fc2"
    assert (
        select_ternary_layers(model, TernaryQATConfig(), exclude=["*.adaLN_modulation.1"])[-1]
        == "blocks.1.mlp.fc2"
    )
    # adaLN-Zero weights: α falls back to 1/sqrt(in) so the zero layers still learn, in both scale modes.
    for scale in ("alpha", "gamma"):
        torch.manual_seed(0)
        m = DiT(
            DiTConfig(depth=2, hidden_size=64, num_heads=4, input_size=8, num_classes=10, adaln_norm=True)
        )
        with torch.no_grad():  # a non-zero output layer, so gradients reach the blocks
            for p in m.final_layer.parameters():
                p.normal_(0, 0.1)
        quantize_(m, TernaryQATConfig(scale=scale))
        ada = m.blocks[0].adaLN_modulation[1]
        assert isinstance(ada, TernaryQATLinear) and ada.weight.abs().max() == 0
        if scale == "alpha":
            assert ada.alphas.item() == pytest.approx(1 / 8)
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 10])
        m(x, t, y).pow(2).sum().backward()
        assert ada.weight.grad.abs().max() > 0, scale


def test_convert_respects_include_and_leaves_other_qat_layers():
    model = _large_dit()
    quantize_(model, TernaryQATConfig())
    quantize_(model, TernaryQATConfig(step="convert"), include=["layers.0.*"])
    kinds = {n: type(m).__name__ for n, m in ternary_layers(model).items()}
    assert kinds["layers.0.attention.wq"] == "TernaryLinear"
    assert kinds["layers.1.attention.wq"] == "TernaryQATLinear"


def test_quantize_errors_leave_the_model_unchanged():
    model = _large_dit()
    with pytest.raises(InvalidArgumentError, match="no TernaryQATLinear layer to convert"):
        quantize_(model, TernaryQATConfig(step="convert"))
    with pytest.raises(InvalidArgumentError, match="no nn.Linear layer matches"):
        quantize_(model, TernaryQATConfig(include=["nothing.*"]))
    with pytest.raises(InvalidArgumentError, match="weight_overrides"):
        quantize_(model, TernaryQATConfig(), weight_overrides={"layers.0.attention.wq": None})
    odd = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    with pytest.raises(InvalidArgumentError, match="'0': 6 input features is not a multiple of 4") as e:
        quantize_(odd, TernaryQATConfig(preset=None))
    assert "\n" not in str(e.value)
    assert all(isinstance(m, nn.Linear) for m in odd)  # nothing swapped: all layers are built first
    assert not ternary_layers(model)
    quantize_(model, TernaryQATConfig())
    with pytest.raises(InvalidArgumentError, match="already ternary"):
        quantize_(model, TernaryQATConfig())
    quantize_(model, TernaryQATConfig(step="convert"))
    with pytest.raises(InvalidArgumentError, match="already converted"):
        quantize_(model, TernaryQATConfig(step="convert"))


def test_qdit_path_is_unchanged_by_the_dispatch():
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=1, hidden_size=64, num_heads=4, input_size=8, num_classes=10))
    quantize_(model, QDiTConfig(w_bits=4, a_bits=8, w_group=32))
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear)
    assert not ternary_layers(model)


@pytest.mark.parametrize("training", [False, True])
def test_converted_and_skeleton_layers_keep_the_mode_of_the_layers_they_replace(training):
    # New Modules start in training mode; an eval model must get eval layers (which run the kernels).
    model = LargeDiT(TINY).train(training)
    quantize_(model, TernaryQATConfig())
    quantize_(model, TernaryQATConfig(step="convert"))
    skeleton = empty_ternary_(LargeDiT(TINY).train(training))
    for m in (model, skeleton):
        layers = [x for x in m.modules() if isinstance(x, TernaryLinear)]
        assert layers and all(x.training == training for x in layers)
