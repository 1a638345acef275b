"""The prepack cache: hits, in-place writes, freed weights, and no deadlock when a weight is freed
under its lock."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import ops
from ditq.kernels.cpu import levels, prepack


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _int8(shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def test_prepack_cache_survives_a_weight_freed_while_its_lock_is_held(built):
    # a garbage collection can free a cached weight inside any allocation, also one made while the
    # cache holds its lock: the weakref callback must not wait for that lock (it deadlocked once)
    import threading

    w = torch.ones(3, 2)
    prepack.cache.get(w, ("t", torch.float32))
    before = len(prepack.cache)  # other tests' weights may still be cached
    done = []

    def free_under_lock():
        nonlocal w
        with prepack.cache._lock:
            del w  # the callback runs here, synchronously
        done.append(len(prepack.cache))

    t = threading.Thread(target=free_under_lock, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "the prepack cache deadlocked on a weight freed under its lock"
    assert done == [before - 1]  # and the freed weight's entry is gone


def test_prepack_cache_hits_follows_inplace_writes_and_forgets_freed_weights(built, monkeypatch):
    if built < levels.AVX2:
        pytest.skip("weights are prepacked on the SIMD paths only")
    calls = []
    real = prepack._prepack
    monkeypatch.setattr(prepack, "_prepack", lambda w, bits: calls.append(bits) or real(w, bits))
    prepack.clear_prepack_cache()
    xq, xs = _int8((4, 64), 31), torch.ones(4, 1)
    wq = _int8((8, 64), 32, lo=-127)  # negating keeps every code in range
    first = ops.w8a8_linear(xq, xs, wq, torch.ones(1))
    ops.w8a8_linear(xq, xs, wq, torch.ones(1))
    assert calls == [8] and len(prepack.cache) == 1
    wq.mul_(-1)  # an in-place write bumps the version: the next call re-prepacks
    second = ops.w8a8_linear(xq, xs, wq, torch.ones(1))
    assert calls == [8, 8] and torch.equal(second, -first)
    del wq
    assert len(prepack.cache) == 0
    with torch.inference_mode():  # inference tensors have no version counter: keyed by pointer
        wi = _int8((8, 64), 33)
        ops.w8a8_linear(xq, xs, wi, torch.ones(1))
        ops.w8a8_linear(xq, xs, wi, torch.ones(1))
    assert calls == [8, 8, 8]
