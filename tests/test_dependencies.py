"""The dependency rules of DESIGN.md, checked over the import graph of ``src/ditq`` so they cannot rot.

Every ``import`` and ``from ... import`` in every module counts, function-level
ones included: an import inside a function is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ditq

SRC = Path(ditq.__file__).parent

FORBIDDEN = {
    "models": {"quant", "kernels", "diffusion", "formats", "pipelines", "train", "eval", "cli"},
    "diffusion": {"models", "quant", "kernels", "formats", "pipelines", "train", "eval", "cli"},
    "quant": {"models", "diffusion", "eval", "formats", "pipelines", "train", "cli"},
    "eval": {"models", "quant", "formats", "pipelines", "train", "cli"},
    "kernels": None,  # only ditq.errors, checked below
}
"""package -> the ditq packages it must not import."""


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` for every ditq import in ``path``."""
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, this: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    package = this if is_package else this.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names], node.lineno))
    return [f for f in found if f[0] == "ditq" or f[0].startswith("ditq.")]


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _is_module(name: str) -> bool:
    return (SRC.parent / Path(*name.split("."))).with_suffix(".py").is_file() or (
        SRC.parent / Path(*name.split(".")) / "__init__.py"
    ).is_file()


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_the_design_allows(package):
    bad = []
    for path in _modules():
        if _package(_module_name(path)) != package:
            continue
        for module, names, line in _imports(path):
            targets = {module} | {f"{module}.{n}" for n in names if _is_module(f"{module}.{n}")}
            for target in targets:
                other = _package(target)
                if other is None or other == package:
                    continue
                if package == "kernels":
                    ok = target == "ditq.errors" or (target == "ditq" and set(names) <= {"errors"})
                else:
                    ok = other not in FORBIDDEN[package]
                if not ok:
                    bad.append(f"{path.relative_to(SRC.parent)}:{line} imports {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in _modules():
        this = _module_name(path)
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}  # local name -> ditq module it stands for
        for module, names, line in _imports(path):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and module != this:
                    bad.append(f"{path.relative_to(SRC.parent)}:{line} imports {module}.{n}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ditq"):
                for a in node.names:
                    if _is_module(f"{node.module}.{a.name}"):
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("ditq") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != this
            ):
                bad.append(
                    f"{path.relative_to(SRC.parent)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"
                )
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_rules_see_real_imports():
    """The scanner finds what it must (else the tests above could never fail)."""
    found = {m for p in _modules() if _module_name(p) == "ditq.formats.loader" for m, _, _ in _imports(p)}
    assert "ditq.formats" in found and "ditq.models" in found


def test_the_scanner_sees_every_way_of_importing():
    source = "\n".join(
        ["import ditq.kernels.ops", "from ditq import quant", "from ..kernels import packing", "def f():",
         "    from ditq.quant.api import quantize_"]
    )  # fmt: skip
    found = {(m, tuple(n)) for m, n, _ in _imports_of(source, "ditq.models.dit", is_package=False)}
    assert found == {
        ("ditq.kernels.ops", ()),
        ("ditq", ("quant",)),
        ("ditq.kernels", ("packing",)),
        ("ditq.quant.api", ("quantize_",)),
    }
