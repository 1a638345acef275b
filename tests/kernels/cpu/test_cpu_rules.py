"""The rule table: what each op reports on this machine, what will run before the build, and
torch._int_mm only where it beats float."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import ops, reference
from ditq.kernels.cpu import extension, levels, rules
from ditq.kernels.cpu import ops as cpu_ops


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def test_available_backends_names_each_op(built):
    backends = rules.available_backends()
    assert backends["extension"].startswith(f"built ({levels.ISAS[built]})")
    assert set(ops.OPS) <= set(backends)
    producers = [op for op in ops.OPS if op.endswith("_quantize_int8") and op != "quantize_per_token_int8"]
    assert len(producers) == 4
    for op in producers:
        assert backends[op] == f"cpp-{levels.ISAS[built]}"
    if built == levels.AVX512_VNNI:
        assert backends["w8a8_linear"] == backends["w158a8_linear"] == "cpp-avx512_vnni"
        assert backends["w4a8_linear"] == "cpp-avx512_vnni"
    if built >= levels.AVX2:
        for op in ("ternary_linear", "int4_linear"):
            assert backends[op].startswith(
                f"cpp-{levels.ISAS[built]} (M <= {cpu_ops.WEIGHT_ONLY_DIRECT_MAX_M})"
            )


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx2", "fma", "avx512f", "avx512_vnni"}])
def test_w8a8_runs_torch_int_mm_only_where_it_beats_float(built, monkeypatch, flags):
    # torch._int_mm has no fast CPU path without int8 dot products: 0.03-0.10x fp32 on an AVX2-only
    # EPYC. Where ditq's kernels cannot run (here: capped at scalar), auto must not pick it there.
    monkeypatch.setattr(levels, "_cpu_flags", lambda: frozenset(flags))
    xq, wq = _int8((5, 64), 41), _int8((7, 64), 42)
    levels.set_isa("scalar")
    try:
        fast = "avx512_vnni" in flags
        assert rules.available_backends()["w8a8_linear"] == ("torch._int_mm" if fast else "reference")
        assert ops.has_fast_impl("w8a8_linear", "cpu") == fast
        out = cpu_ops.w8a8_linear(xq, torch.ones(5, 1), wq, torch.ones(7), None, torch.float32)
        assert (out is NotImplemented) == (not fast)
        assert torch.equal(ops.w8a8_linear(xq, torch.ones(5, 1), wq, torch.ones(7)),
                           reference.ref_w8a8_linear(xq, torch.ones(5, 1), wq, torch.ones(7)))  # fmt: skip
    finally:
        levels.set_isa(None)


def test_what_will_run_is_known_before_the_build(fresh_state, monkeypatch):
    monkeypatch.setattr(levels, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert rules.available_backends() == {
        "extension": rules.available_backends()["extension"]
    }  # nothing built
    assert rules.planned_backends()["w8a8_linear"] == "cpp-avx2"
    if ops.implementation("w158a8_linear", "cpu", build=False) != "reference":  # a compiler is there
        assert ops.implementation("w158a8_linear", "cpu", build=False) == "cpp-avx2 (built on first use)"
    assert not extension.state.tried
    monkeypatch.setattr(levels, "_cpu_flags", lambda: frozenset({"avx2", "fma", "avx_vnni"}))
    planned = rules.planned_backends()  # AVX-VNNI: its own GEMMs, AVX2 code for the rest
    assert planned["w158a8_linear"] == "cpp-avx_vnni" and planned["gelu_quantize_int8"] == "cpp-avx2"
    monkeypatch.setattr(levels, "_cpu_flags", lambda: frozenset({"sse4_2"}))
    assert rules.planned_backends()["w4a8_linear"] == "reference"
