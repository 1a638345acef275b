"""ditq.quant.size: model_size_bytes by hand on Sequentials and on a tiny DiT, the plan before quantizing
equal to the quantized result."""

from __future__ import annotations

import torch
from torch import nn

from ditq.models import DiT, DiTConfig
from ditq.quant import QDiTConfig, model_size_bytes, quantize_
from ditq.quant.presets import preset_for

TINY = DiTConfig(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10)


def _dit(seed: int = 0) -> DiT:
    """A tiny DiT with every weight random; std 0.1 makes the blocks matter (~half of the output)."""
    torch.manual_seed(seed)
    model = DiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.eval()


def test_model_size_bytes_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    assert preset_for(model) is None
    fp = (64 * 32 + 32 + 32 * 16 + 16) * 4
    assert model_size_bytes(model) == fp == 10432
    cfg = QDiTConfig(w_bits=4, w_group=16, include=["0"])
    # layer 0: 64*32 codes at 4 bits + 32*4 fp16 scales + 32*4 fp16 zeros + fp32 bias; layer 2 as is
    by_hand = 64 * 32 // 2 + 32 * 4 * 2 + 32 * 4 * 2 + 32 * 4 + (32 * 16 + 16) * 4
    assert by_hand == 3776
    assert model_size_bytes(model, cfg) == by_hand  # the plan, before quantizing
    quantize_(model, cfg)
    assert model_size_bytes(model) == by_hand == model_size_bytes(model, cfg)
    sym = QDiTConfig(w_bits=4, w_group=16, w_sym=True, include=["0"])
    assert model_size_bytes(nn.Sequential(nn.Linear(64, 32)), sym) == 1024 + 256 + 128  # no zero points
    static = QDiTConfig(w_bits=3, w_group=0, a_group=-1, dynamic=False, preset=None)
    tail = nn.Sequential(nn.Linear(32, 16))
    odd = (16 * 32 * 3 + 7) // 8 + 16 * 2 * 2 + 16 * 4 + 2 * 2  # ceil(bits/8), one static range
    assert model_size_bytes(tail, static) == odd
    assert model_size_bytes(quantize_(tail, static)) == odd


def test_model_size_bytes_on_a_dit_plan_equals_result():
    cfg = QDiTConfig(w_bits=4, w_group=32)
    model = _dit()
    fp = model_size_bytes(model)
    assert fp == sum(p.numel() * 4 for p in model.parameters())
    plan = model_size_bytes(model, cfg)
    quantize_(model, cfg)
    assert model_size_bytes(model) == plan < fp
