"""Kernel backend selection: what this machine has, choosing globally and for a block, what each choice
dispatches to, what a call would run, and one-line errors for backends that are unknown or not
available here."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import KernelError, cpu, dispatch, ops, pack_ternary, reference
from ditq.kernels.cpu import extension


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    dispatch.set_backend("auto")


def _args():
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-127, 128, (3, 16), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (5, 16), generator=g, dtype=torch.int8)
    return xq, torch.rand(3, 1, generator=g) + 0.1, wq, torch.rand(5, generator=g) + 0.1, None, torch.float32


@pytest.fixture
def spy_impl():
    """A fake CPU implementation of w8a8_linear that records its calls (the real one restored after)."""
    previous = dispatch.registered_impl("w8a8_linear", "cpu")
    calls = []

    def impl(*args):
        calls.append("cpu")
        return torch.full((3, 5), 7.0)

    dispatch.register_impl("w8a8_linear", "cpu", impl)
    yield calls
    dispatch.register_impl("w8a8_linear", "cpu", previous)


def test_available_backends_always_has_the_reference():
    have = dispatch.available_backends()
    assert have[0] == "reference" and set(have) <= {"reference", "cpu", "triton"}
    if not torch.cuda.is_available():
        assert "triton" not in have
    assert dispatch.get_backend() == "auto" and dispatch.BACKENDS == ("auto", "reference", "cpu", "triton")


def test_set_backend_returns_the_previous_choice_and_use_backend_restores_it():
    assert dispatch.set_backend("reference") == "auto"
    assert dispatch.get_backend() == "reference"
    with dispatch.use_backend("auto"):
        assert dispatch.get_backend() == "auto"
        with dispatch.use_backend(None):  # None: leave it as it is
            assert dispatch.get_backend() == "auto"
    assert dispatch.get_backend() == "reference"
    with pytest.raises(KernelError), dispatch.use_backend("reference"):
        raise KernelError("inside")
    assert dispatch.get_backend() == "reference"


def test_each_backend_dispatches_where_it_says(spy_impl):
    args = _args()
    assert torch.equal(ops.w8a8_linear(*args), torch.full((3, 5), 7.0))  # auto: the registered impl
    with dispatch.use_backend("reference"):
        assert torch.equal(ops.w8a8_linear(*args), reference.ref_w8a8_linear(*args))
        assert torch.equal(torch.ops.ditq.w8a8_linear(*args), reference.ref_w8a8_linear(*args))
    assert spy_impl == ["cpu"]
    if "cpu" in dispatch.available_backends():
        with dispatch.use_backend("cpu"):
            ops.w8a8_linear(*args)
        assert spy_impl == ["cpu", "cpu"]
    assert not dispatch.has_fast_impl("w8a8_linear", "cpu", "reference")
    assert not dispatch.has_fast_impl("int4_linear", "cpu", "reference")
    assert not dispatch.has_fast_impl("int4_linear", "cuda", "cpu")  # a backend of another device


def test_a_forced_backend_falls_back_to_the_reference_only_where_its_impl_declines():
    if "cpu" not in dispatch.available_backends():
        pytest.skip("no C++ CPU kernels here")
    previous = dispatch.registered_impl("w8a8_linear", "cpu")
    try:
        dispatch.register_impl("w8a8_linear", "cpu", lambda *a: NotImplemented)
        with dispatch.use_backend("cpu"):
            assert torch.equal(ops.w8a8_linear(*_args()), reference.ref_w8a8_linear(*_args()))
    finally:
        dispatch.register_impl("w8a8_linear", "cpu", previous)


def test_resolve_backend_names_the_implementation_per_device():
    assert dispatch.resolve_backend("cpu", "reference") == "reference"
    auto = dispatch.resolve_backend("cpu", "auto")
    assert auto == ("cpu" if "cpu" in dispatch.available_backends() else "reference")
    if "cpu" in dispatch.available_backends():
        with pytest.raises(KernelError, match="runs on cpu tensors, not meta ones") as e:
            dispatch.resolve_backend("meta", "cpu")
        assert "\n" not in str(e.value)


def test_unknown_and_unavailable_backends_are_one_line_errors():
    with pytest.raises(KernelError, match="unknown kernel backend 'cuda'; choose one of auto, reference"):
        dispatch.set_backend("cuda")
    if not torch.cuda.is_available():
        with pytest.raises(KernelError) as e:
            dispatch.set_backend("triton")
        msg = str(e.value)
        assert "'triton' is not available here (no CUDA device)" in msg
        assert "available: auto, reference" in msg
        assert "\n" not in msg
    assert dispatch.get_backend() == "auto"  # a refused choice changes nothing


def test_cpu_backend_unavailable_when_the_kernels_are_switched_off(monkeypatch):
    extension._reset_for_tests()
    try:
        monkeypatch.setenv(extension.ENV_DISABLE, "0")
        assert "cpu" not in dispatch.available_backends()
        with pytest.raises(KernelError, match="'cpu' is not available here .*disabled by DITQ_CPU_KERNELS=0"):
            dispatch.set_backend("cpu")
        extension.build()  # tried and switched off: the same answer
        assert "cpu" not in dispatch.available_backends()
        assert not dispatch.has_fast_impl("w158a8_linear", "cpu")
    finally:
        monkeypatch.delenv(extension.ENV_DISABLE)
        extension._reset_for_tests()


def test_has_fast_impl_follows_the_cpu_build():
    if not cpu.build():
        pytest.skip("no C++ CPU kernels here")
    for op in ("quantize_per_token_int8", "w8a8_linear", "w158a8_linear"):
        want = cpu.available_backends()[op] != "reference"
        assert dispatch.has_fast_impl(op, "cpu") == want == dispatch.has_fast_impl(op, "cpu", build=False)
    w = pack_ternary(torch.zeros(4, 8))
    with dispatch.use_backend("reference"):  # layers ask this before calling: the reference is no fast path
        assert not dispatch.has_fast_impl("w158a8_linear", torch.device("cpu"))
        assert ops.ternary_linear(torch.ones(2, 8), w, torch.ones(1)).shape == (2, 4)
