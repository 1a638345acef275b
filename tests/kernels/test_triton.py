"""The Triton kernels as a package (ditq.kernels.triton): registration as the "cuda" implementations,
importing without Triton; and how all the Triton kernel tests run.

The kernels are tested against the ops' references (odd shapes, poisoned outputs,
declined calls) in one file per module: test_triton_quantize.py,
test_triton_producers.py, test_triton_gemm.py and test_triton_launch.py, with this
one (KERNEL_TEST_FILES); test_triton_aot.py compiles them ahead of time.

How these files run. Triton chooses between compiling and interpreting a kernel
when ``@triton.jit`` decorates it, and its interpreter needs ``TRITON_INTERPRET=1``
before Triton itself is imported (Triton's own library functions are jit'd at
import). Setting the variable from a test would come too late if anything had
imported Triton already, and would leak into the rest of the session (on a GPU
machine it would turn every later Triton kernel into interpreted code). So:

* ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton*.py``: the kernel tests
  run on CPU tensors in the interpreter, at small shapes;
* on a CUDA machine (variable unset): the same tests run compiled on the GPU,
  plus the ``gpu`` tests at DiT shapes;
* otherwise (a CPU-only run of the suite): ``test_kernels_in_the_interpreter``
  runs KERNEL_TEST_FILES again in a subprocess with ``TRITON_INTERPRET=1``; a
  failure there shows that run's report.

Tiles under the interpreter are 16 x 16 (x 32 in K for int8; 16 for floats), so
the tests' shapes have partial tiles in M, N and K and several K steps.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from triton_helpers import CUDA, HAS_TRITON, INTERPRET, needs_kernels

import ditq.kernels
from ditq.kernels import ops

KERNEL_TEST_FILES = [
    Path(__file__).resolve().with_name(name)
    for name in (
        "test_triton.py",
        "test_triton_quantize.py",
        "test_triton_producers.py",
        "test_triton_gemm.py",
        "test_triton_launch.py",
    )
]
"""The files whose kernel tests ``test_kernels_in_the_interpreter`` runs in the interpreter."""


# ----------------------------------------------------------------------------
# Registration, importing without Triton, the interpreter run
# ----------------------------------------------------------------------------


@needs_kernels
def test_register_makes_the_kernels_the_cuda_implementations(launch):
    import ditq.kernels.triton as tk

    before = {op: ops.registered_impl(op, "cuda") for op in ops.OPS}
    try:
        assert tk.available()
        assert tk.register()
        for op in ops.OPS:
            assert ops.registered_impl(op, "cuda") is getattr(launch, op)
            assert getattr(tk, op) is getattr(launch, op)
        tk.unregister()
        assert all(ops.registered_impl(op, "cuda") is None for op in ops.OPS)
    finally:
        for op, fn in before.items():
            ops.register_impl(op, "cuda", fn)


def test_import_without_triton_never_fails(monkeypatch):
    """With Triton missing, the package imports, registers nothing and says why it is unavailable."""
    for name in [
        m for m in sys.modules if m == "ditq.kernels.triton" or m.startswith("ditq.kernels.triton.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(ditq.kernels, "triton", None, raising=False)  # restored (or removed) afterwards
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that available() gets as far as importing it
    before = {op: ops.registered_impl(op, "cuda") for op in ops.OPS}
    tk = importlib.import_module("ditq.kernels.triton")
    assert not tk.available() and not tk.register()
    assert "not importable" in tk.unavailable_reason()
    assert {op: ops.registered_impl(op, "cuda") for op in ops.OPS} == before


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET or CUDA, reason="the kernel tests run in this process")
def test_kernels_in_the_interpreter():
    """The kernel tests of KERNEL_TEST_FILES, in a fresh process with TRITON_INTERPRET=1 (see the module
    docstring)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, KERNEL_TEST_FILES)]
    cmd += ["-k", "not test_kernels_in_the_interpreter", "-m", "not gpu"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, report
