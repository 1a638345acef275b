"""``ditq.models`` is the math only: building and running its models loads neither ``ditq.quant`` nor
``ditq.kernels`` (the import rules themselves are checked in tests/test_dependencies.py).

Fusing a producer with its consumers' quantization is a module swap at deploy time
(:mod:`ditq.quant.fuse`).
"""

from __future__ import annotations

import subprocess
import sys


def test_building_and_running_models_loads_neither():
    code = """
import sys, torch
from ditq.models import DiT, DiTConfig, LargeDiT, LargeDiTConfig
x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 500.0]), torch.tensor([0, 1])
DiT(DiTConfig(depth=1, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=1))(x, t, y)
LargeDiT(LargeDiTConfig(dim=64, n_layers=1, n_heads=2, patch_size=2, input_size=8, in_channels=1))(x, t, y)
print(sorted(m for m in sys.modules if m.startswith(("ditq.quant", "ditq.kernels"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
