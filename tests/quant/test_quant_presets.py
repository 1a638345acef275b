"""ditq.quant.presets: the families a model is recognized as (preset_for, get_preset) and the layers each
preset quantizes: a ditq DiT, a Large-DiT-named module tree, a diffusers DiT (W8A8 close to float) and
PixArt built from configs; adaLN linears only when asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditq.models import DiT, DiTConfig
from ditq.quant import QDiTConfig, QuantLinear, quantize_, quantized_layers
from ditq.quant.api import select_layers
from ditq.quant.presets import get_preset, preset_for

TINY = DiTConfig(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10)


BLOCK_LAYERS = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def _dit(seed: int = 0) -> DiT:
    """A tiny DiT with every weight random; std 0.1 makes the blocks matter (~half of the output)."""
    torch.manual_seed(seed)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_dit_preset_selects_block_linears_only():
    model = _dit()
    assert preset_for(model).name == "dit"
    quantize_(model, QDiTConfig(w_group=32))
    assert list(quantized_layers(model)) == BLOCK_LAYERS
    for name in (
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
    ):
        assert type(model.get_submodule(name)) is nn.Linear
    assert type(model.get_submodule("blocks.0.adaLN_modulation.1")) is nn.Linear
    adaln = quantize_(_dit(), QDiTConfig(w_group=32, quantize_adaln=True))
    expected = sorted(BLOCK_LAYERS + ["blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1"])
    assert sorted(quantized_layers(adaln)) == expected


class _LargeDiTLike(nn.Module):
    """Module names of Large-DiT / TerDiT (fixtures/README.md §1.3), with plain linears."""

    def __init__(self, dim: int = 32, depth: int = 2):
        super().__init__()
        self.x_embedder = nn.Linear(16, dim)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.attention = nn.Module()
            for n in ("wq", "wk", "wv", "wo"):
                setattr(block.attention, n, nn.Linear(dim, dim, bias=False))
            block.feed_forward = nn.Module()
            block.feed_forward.w1 = nn.Linear(dim, 64, bias=False)
            block.feed_forward.w2 = nn.Linear(64, dim, bias=False)
            block.feed_forward.w3 = nn.Linear(dim, 64, bias=False)
            block.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
            self.layers.append(block)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(dim, 32)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


def test_large_dit_preset():
    model = _LargeDiTLike()
    assert preset_for(model).name == "large-dit"
    expected = [
        f"layers.{i}.{n}"
        for i in range(2)
        for n in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
        + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    ]
    assert select_layers(model, QDiTConfig(w_group=32)) == expected
    with_adaln = select_layers(model, QDiTConfig(w_group=32, quantize_adaln=True))
    assert sorted(with_adaln) == sorted(
        expected + ["layers.0.adaLN_modulation.1", "layers.1.adaLN_modulation.1"]
    )
    assert get_preset("large-dit") is preset_for(model)


def _diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    ).eval()


def test_diffusers_dit_w8a8():
    model = _diffusers_dit()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=y).sample
    assert preset_for(model).name == "diffusers"
    quantize_(model, QDiTConfig(w_bits=8, a_bits=8, w_group=0))
    expected = [
        f"transformer_blocks.{i}.{n}"
        for i in range(2)
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
    ]
    assert list(quantized_layers(model)) == expected
    for name in ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "proj_out_1", "proj_out_2"):
        assert type(model.get_submodule(name)) is nn.Linear
    assert type(model.get_submodule("transformer_blocks.0.norm1.linear")) is nn.Linear  # adaLN: optional
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y).sample
    assert _rel(out, ref) < 0.02
    assert "transformer_blocks.1.norm1.linear" in select_layers(
        _diffusers_dit(), QDiTConfig(quantize_adaln=True)
    )


def test_diffusers_pixart_names():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    assert preset_for(model).name == "diffusers"
    names = select_layers(model, QDiTConfig())
    assert names == [
        f"transformer_blocks.0.{n}"
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
        + ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    ]
    assert select_layers(model, QDiTConfig(quantize_adaln=True)) == names + ["adaln_single.linear"]
    assert isinstance(
        quantize_(model, QDiTConfig(w_group=8)).get_submodule("transformer_blocks.0.ff.net.2"), QuantLinear
    )
