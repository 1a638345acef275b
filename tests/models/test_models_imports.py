"""``ditq.models`` is the math only: it imports neither ``ditq.quant`` nor ``ditq.kernels``.

Fusing a producer with its consumers' quantization is a module swap at deploy time
(:mod:`ditq.quant.fuse`). ``hub.py`` and ``terdit.py`` (loading, on their way out of
``models``) are not checked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ditq.models

MODELS = Path(ditq.models.__file__).parent
LOADERS = {"hub.py", "terdit.py"}
FORBIDDEN = ("ditq.quant", "ditq.kernels")


def _ditq_imports(source: str, package: str = "ditq.models") -> set[str]:
    """The ditq modules (and names, ``from ditq import quant`` as ``ditq.quant``) a module imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names |= {module, *(f"{module}.{a.name}" for a in node.names)}
    return {n for n in names if n == "ditq" or n.startswith("ditq.")}


def test_models_import_neither_quant_nor_kernels():
    files = sorted(p for p in MODELS.glob("*.py") if p.name not in LOADERS)
    assert {"dit.py", "large_dit.py", "layers.py"} <= {p.name for p in files}
    for path in files:
        for name in _ditq_imports(path.read_text()):
            assert not name.startswith(FORBIDDEN), f"models/{path.name} imports {name}"


def test_the_check_sees_every_way_of_importing():
    lines = ["import ditq.kernels.ops", "from ditq import quant", "from ..kernels import packing"]
    found = _ditq_imports("\n".join([*lines, "from . import dit"]))
    assert {"ditq.kernels.ops", "ditq.quant", "ditq.kernels.packing", "ditq.models.dit"} <= found


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
