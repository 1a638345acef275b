"""``ditq.kernels`` sits at the bottom of the package: it imports nothing of ditq but ``ditq.errors``."""

from __future__ import annotations

import ast
from pathlib import Path

import ditq.kernels

KERNELS = Path(ditq.kernels.__file__).parent


def _ditq_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n == "ditq" or n.startswith("ditq.")}


def test_kernels_import_only_themselves_and_errors():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 5
    for path in files:
        for name in _ditq_imports(path):
            assert name.startswith("ditq.kernels") or name == "ditq.errors", f"{path.name} imports {name}"


def test_kernel_errors_are_ditq_errors():
    # the CLI turns DitqError into one line and status 2; a KernelError must not be a traceback
    from ditq.errors import DitqError

    assert issubclass(ditq.kernels.KernelError, DitqError)
    assert issubclass(ditq.kernels.KernelError, ValueError)  # what callers caught before
