"""ditq.quant.select: which layers a config swaps: include/exclude patterns (fnmatch and re:), from the
config or the arguments (which win), the preset's layers by default, every nn.Linear of an unknown model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.models import DiT, DiTConfig
from ditq.quant import QDiTConfig, quantize_, quantized_layers
from ditq.quant.api import select_layers

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


def test_include_exclude_patterns():
    cfg = QDiTConfig(w_group=32)
    model = _dit()
    assert select_layers(model, cfg, include=["blocks.*.mlp.*"], exclude=["blocks.1.*"]) == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    assert select_layers(model, cfg, include=[r"re:blocks\.\d+\.attn\.(qkv|proj)"], exclude=[]) == [
        n for n in BLOCK_LAYERS if ".attn." in n
    ]
    from_cfg = QDiTConfig(w_group=32, include=["final_layer.*"], exclude=["*adaLN*"])
    assert select_layers(model, from_cfg) == ["final_layer.linear"]
    # the argument wins over the config
    assert select_layers(model, from_cfg, include=["t_embedder.*"], exclude=["*.0"]) == ["t_embedder.mlp.2"]
    every = select_layers(model, QDiTConfig(preset=None))
    assert len(every) == 2 + 8 + 2 + 2  # t_embedder, blocks (4 + adaLN each), final layer
    assert select_layers(model, QDiTConfig(exclude=["blocks.1.*"])) == BLOCK_LAYERS[:4]
    quantize_(model, cfg, include="blocks.0.mlp.fc2")
    assert list(quantized_layers(model)) == ["blocks.0.mlp.fc2"]


def test_unknown_model_quantizes_every_linear():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 8)))
    quantize_(model, QDiTConfig(w_group=8))
    assert list(quantized_layers(model)) == ["0", "2.0"]
    with pytest.raises(InvalidArgumentError, match="no nn.Linear layer matches"):
        quantize_(nn.Linear(8, 8), QDiTConfig(w_group=8))  # the root itself cannot be swapped in place
