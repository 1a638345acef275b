"""Building and loading the C++ library: threads, a failed build, a compiler without OpenMP, every
source compiled and every file in the build's key, a missing source, switched off by the environment,
nothing built at import."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from ditq.kernels import ops, pack_ternary, reference
from ditq.kernels.cpu import extension, levels, rules


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def _on_two_threads(fn):
    """``fn()`` with two torch threads (the session runs single-threaded, see conftest), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_the_kernels_run_on_the_threads_torch_is_given(built):
    # the GEMMs split work with at::parallel_for; built without OpenMP it ran on one thread
    assert extension.threads_used() == 1  # the test session runs single-threaded (conftest)
    assert _on_two_threads(extension.threads_used) == 2


def test_build_failure_warns_once_and_falls_back(fresh_state, monkeypatch, poisoned):
    def broken(verbose):
        raise RuntimeError("Error building extension 'ditq_cpu_kernels': g++: not found")

    monkeypatch.setattr(extension, "_compile", broken)
    xq, wq = _int8((3, 36), 41), _int8((5, 36), 42)
    wp = pack_ternary(torch.randint(-1, 2, (5, 36), generator=_gen(43)))
    x = torch.randn(3, 36, generator=_gen(44))
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels are unavailable .*g\\+\\+: not found"):
        out = ops.w8a8_linear(xq, torch.ones(3, 1), wq, torch.ones(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        out2 = ops.w158a8_linear(xq, torch.ones(3, 1), wp, torch.ones(1))
        q, s = ops.quantize_per_token_int8(x)
    assert torch.equal(out, reference.ref_w8a8_linear(xq, torch.ones(3, 1), wq, torch.ones(5)))
    assert torch.equal(out2, reference.ref_w158a8_linear(xq, torch.ones(3, 1), wp, torch.ones(1)))
    assert all(map(torch.equal, (q, s), reference.ref_quantize_per_token_int8(x)))
    backends = rules.available_backends()
    assert backends["extension"].startswith("unavailable: RuntimeError: Error building extension")
    int_mm = "torch._int_mm" if levels.int_mm_is_fast() else "reference"  # fast only with VNNI / AMX
    assert backends["w8a8_linear"] == int_mm and backends["w158a8_linear"] == "reference"


def test_a_compiler_without_openmp_still_builds_one_thread_kernels(monkeypatch):
    from torch.utils import cpp_extension

    calls = []

    def load(**kw):
        calls.append(kw["extra_cflags"])
        if "-fopenmp" in kw["extra_cflags"]:
            raise RuntimeError("error: unsupported option '-fopenmp'")
        return "/tmp/libditq.so"

    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.warns(RuntimeWarning, match="built without OpenMP .*-fopenmp.*run on one thread"):
        assert extension._compile(verbose=False) == "/tmp/libditq.so"
    assert ["-fopenmp" in c for c in calls] == [True, False]


def test_the_build_compiles_every_source_and_keys_on_every_file(monkeypatch, tmp_path):
    # a .cpp left out of SOURCES would not be compiled (its C functions missing at load), and an edit
    # to the header must rebuild the library as an edit to a source does (torch hashes sources only)
    from torch.utils import cpp_extension

    assert sorted(extension.SOURCES) == sorted(extension.CSRC.glob("*.cpp"))
    assert sorted(extension.HEADERS) == sorted(extension.CSRC.glob("*.h"))
    copies = {path: tmp_path / path.name for path in (*extension.SOURCES, *extension.HEADERS)}
    for path, copy in copies.items():
        copy.write_bytes(path.read_bytes())
    monkeypatch.setattr(extension, "SOURCES", tuple(copies[p] for p in extension.SOURCES))
    monkeypatch.setattr(extension, "HEADERS", tuple(copies[p] for p in extension.HEADERS))
    before = extension.csrc_digest()
    header = extension.HEADERS[0]
    header.write_text(header.read_text() + "// an edit\n")
    assert extension.csrc_digest() != before
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "/tmp/libditq.so")
    assert extension._compile(verbose=False) == "/tmp/libditq.so"
    assert calls[0]["sources"] == [str(p) for p in extension.SOURCES]
    assert f"-DDITQ_CSRC_DIGEST={extension.csrc_digest()}" in calls[0]["extra_cflags"]


def test_missing_source_is_a_build_failure(fresh_state, monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "SOURCES", (tmp_path / "missing.cpp",))
    with pytest.warns(RuntimeWarning, match="missing"):
        assert extension.build() is False
    assert "FileNotFoundError" in rules.available_backends()["extension"]


def test_disabled_by_environment(fresh_state, monkeypatch):
    monkeypatch.setenv(extension.ENV_DISABLE, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switching the kernels off is not worth a warning
        assert extension.build() is False
    assert "disabled by DITQ_CPU_KERNELS=0" in rules.available_backends()["extension"]


def test_importing_ditq_builds_nothing():
    code = (
        "import ditq, ditq.kernels, ditq.quant\n"
        "from ditq.kernels import cpu\n"
        "from ditq.kernels.cpu import extension\n"
        "assert not extension.state.tried, 'import triggered a build'\n"
        "print(cpu.available_backends()['extension'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("not built yet")
