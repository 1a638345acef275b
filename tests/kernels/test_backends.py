"""Kernel backend selection: what this machine has, choosing globally and for a block, what each choice
dispatches to, and one-line errors for backends that are unknown or not available here."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import KernelError, cpu, ops, pack_ternary


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    ops.set_backend("auto")


def _args():
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-127, 128, (3, 16), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (5, 16), generator=g, dtype=torch.int8)
    return xq, torch.rand(3, 1, generator=g) + 0.1, wq, torch.rand(5, generator=g) + 0.1, None, torch.float32


@pytest.fixture
def spy_impl():
    """A fake CPU implementation of w8a8_linear that records its calls (the real one restored after)."""
    previous = ops.registered_impl("w8a8_linear", "cpu")
    calls = []

    def impl(*args):
        calls.append("cpu")
        return torch.full((3, 5), 7.0)

    ops.register_impl("w8a8_linear", "cpu", impl)
    yield calls
    ops.register_impl("w8a8_linear", "cpu", previous)


def test_available_backends_always_has_the_reference():
    have = ops.available_backends()
    assert have[0] == "reference" and set(have) <= {"reference", "cpu", "triton"}
    if not torch.cuda.is_available():
        assert "triton" not in have
    assert ops.get_backend() == "auto" and ops.BACKENDS == ("auto", "reference", "cpu", "triton")


def test_set_backend_returns_the_previous_choice_and_use_backend_restores_it():
    assert ops.set_backend("reference") == "auto"
    assert ops.get_backend() == "reference"
    with ops.use_backend("auto"):
        assert ops.get_backend() == "auto"
        with ops.use_backend(None):  # None: leave it as it is
            assert ops.get_backend() == "auto"
    assert ops.get_backend() == "reference"
    with pytest.raises(KernelError), ops.use_backend("reference"):
        raise KernelError("inside")
    assert ops.get_backend() == "reference"


def test_each_backend_dispatches_where_it_says(spy_impl):
    args = _args()
    assert torch.equal(ops.w8a8_linear(*args), torch.full((3, 5), 7.0))  # auto: the registered impl
    with ops.use_backend("reference"):
        assert torch.equal(ops.w8a8_linear(*args), ops.ref_w8a8_linear(*args))
        assert torch.equal(torch.ops.ditq.w8a8_linear(*args), ops.ref_w8a8_linear(*args))
    assert spy_impl == ["cpu"]
    if "cpu" in ops.available_backends():
        with ops.use_backend("cpu"):
            ops.w8a8_linear(*args)
        assert spy_impl == ["cpu", "cpu"]
    assert not ops.has_fast_impl("w8a8_linear", "cpu", "reference")
    assert not ops.has_fast_impl("int4_linear", "cpu", "reference")
    assert not ops.has_fast_impl("int4_linear", "cuda", "cpu")  # a backend of another device


def test_a_forced_backend_falls_back_to_the_reference_only_where_its_impl_declines():
    if "cpu" not in ops.available_backends():
        pytest.skip("no C++ CPU kernels here")
    previous = ops.registered_impl("w8a8_linear", "cpu")
    try:
        ops.register_impl("w8a8_linear", "cpu", lambda *a: NotImplemented)
        with ops.use_backend("cpu"):
            assert torch.equal(ops.w8a8_linear(*_args()), ops.ref_w8a8_linear(*_args()))
    finally:
        ops.register_impl("w8a8_linear", "cpu", previous)


def test_resolve_backend_names_the_implementation_per_device():
    assert ops.resolve_backend("cpu", "reference") == "reference"
    auto = ops.resolve_backend("cpu", "auto")
    assert auto == ("cpu" if "cpu" in ops.available_backends() else "reference")
    if "cpu" in ops.available_backends():
        with pytest.raises(KernelError, match="runs on cpu tensors, not meta ones") as e:
            ops.resolve_backend("meta", "cpu")
        assert "\n" not in str(e.value)


def test_unknown_and_unavailable_backends_are_one_line_errors():
    with pytest.raises(KernelError, match="unknown kernel backend 'cuda'; choose one of auto, reference"):
        ops.set_backend("cuda")
    if not torch.cuda.is_available():
        with pytest.raises(KernelError) as e:
            ops.set_backend("triton")
        msg = str(e.value)
        assert "'triton' is not available here (no CUDA device)" in msg
        assert "available: auto, reference" in msg
        assert "\n" not in msg
    assert ops.get_backend() == "auto"  # a refused choice changes nothing


def test_cpu_backend_unavailable_when_the_kernels_are_switched_off(monkeypatch):
    cpu._reset_for_tests()
    try:
        monkeypatch.setenv(cpu.ENV_DISABLE, "0")
        assert "cpu" not in ops.available_backends()
        with pytest.raises(KernelError, match="'cpu' is not available here .*disabled by DITQ_CPU_KERNELS=0"):
            ops.set_backend("cpu")
        cpu.build()  # tried and switched off: the same answer
        assert "cpu" not in ops.available_backends()
        assert not ops.has_fast_impl("w158a8_linear", "cpu")
    finally:
        monkeypatch.delenv(cpu.ENV_DISABLE)
        cpu._reset_for_tests()


def test_has_fast_impl_follows_the_cpu_build():
    if not cpu.build():
        pytest.skip("no C++ CPU kernels here")
    for op in ("quantize_per_token_int8", "w8a8_linear", "w158a8_linear"):
        want = cpu.available_backends()[op] != "reference"
        assert ops.has_fast_impl(op, "cpu") == want == ops.has_fast_impl(op, "cpu", build=False)
    w = pack_ternary(torch.zeros(4, 8))
    with ops.use_backend("reference"):  # layers ask this before calling: the reference is no fast path
        assert not ops.has_fast_impl("w158a8_linear", torch.device("cpu"))
        assert ops.ternary_linear(torch.ones(2, 8), w, torch.ones(1)).shape == (2, 4)
