"""Prepacked weights: the SIMD kernels' copy of each weight tensor, made once and cached.

The integer GEMMs read weights in panels of 64 output columns that every SIMD level
reads (the layouts: ``csrc/gemm_int8.cpp``, ``csrc/gemm_w4a8.cpp``). :data:`cache` keeps
one copy per weight tensor, keyed by the tensor object, its version counter and data
pointer, and drops it when the tensor is freed. A copy costs the weight's size again for
int8, 2 bits per weight for ternary (k4 + prepacked = 4 bits: 1/8 of float32) and 4
bits per weight plus an int32 code sum per output and segment for int4 (keyed by the
segment length too); W4A8's scales and zero points are kept transposed beside them.
:func:`clear_prepack_cache` empties it.
"""

from __future__ import annotations

import threading
import weakref

import torch

from ditq.kernels.cpu import extension


class _PrepackCache:
    """Prepacked copies of weight tensors, keyed by the tensor object (dropped with it)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}
        self._lock = threading.Lock()
        # (key, weakref) of freed tensors, purged under the lock by the next get: a weakref callback
        # can run inside a garbage collection that a thread holding the lock set off, so taking
        # the lock there would deadlock (it did, once the cache held short-lived scale tensors)
        self._dead: list[tuple] = []

    @staticmethod
    def _stamp(w: torch.Tensor):
        try:
            version = w._version
        except RuntimeError:  # inference tensors have no version counter: data pointer only
            version = None
        return version, w.data_ptr(), tuple(w.shape)

    def _purge(self) -> None:
        while self._dead:
            key, ref = self._dead.pop()
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    def get(self, w: torch.Tensor, bits) -> torch.Tensor:
        key = (id(w), bits)
        stamp = self._stamp(w)
        with self._lock:
            self._purge()
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is w and hit[1] == stamp:
                return hit[2]
        packed = _prepack(w, bits)

        def drop(ref, key=key, dead=self._dead):
            dead.append((key, ref))  # list.append is atomic: no lock here (see __init__)

        with self._lock:
            self._purge()
            self._entries[key] = (weakref.ref(w, drop), stamp, packed)
        return packed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)


cache = _PrepackCache()
"""Prepacked copies of the weights the kernels ran on: ``cache.get(w, bits)`` (see :func:`_prepack`)."""


def clear_prepack_cache() -> None:
    """Drop every cached prepacked weight (they are rebuilt on the next call)."""
    cache.clear()


def _prepack(w: torch.Tensor, bits) -> torch.Tensor:
    """int8 ``[N, K]`` (bits 8), ternary k4 ``[N, K/4]`` (bits 2) or int4 ``[N, K/2]`` (bits
    ``("int4", L)``: with the codes' sums per segment of L inputs) -> the SIMD kernels' layout;
    ``("t", dtype)``: a per-group weight parameter ``[N, G]`` -> ``[G, N]`` in ``dtype`` (the W4A8
    kernel reads scales and zero points by group; transposing them per call cost as much as the
    GEMM at one token)."""
    lib = extension.state.lib
    if isinstance(bits, tuple) and bits[0] == "t":
        return w.to(bits[1]).t().contiguous()
    if isinstance(bits, tuple):  # ("int4", L)
        n, k, seg = w.shape[0], w.shape[1] * 2, bits[1]
        out = torch.empty(int(lib.ditq_prepacked_bytes_w4(n, k, seg)), dtype=torch.uint8)
        extension.check(lib.ditq_prepack_w4(w.contiguous().data_ptr(), n, k, seg, out.data_ptr()))
        return out
    n = w.shape[0]
    k = w.shape[1] if bits == 8 else w.shape[1] * 4
    src = w.contiguous()
    out = torch.empty(int(lib.ditq_prepacked_bytes(n, k, bits)), dtype=torch.uint8)
    fn = lib.ditq_prepack_w8 if bits == 8 else lib.ditq_prepack_w2
    extension.check(fn(src.data_ptr(), n, k, out.data_ptr()))
    return out


def prepacked_bytes(n: int, k: int, bits: int) -> int:
    """Bytes of the prepacked copy of an ``[n, k]`` weight (bits 8 or 2) the SIMD kernels keep."""
    lib = extension.lib()
    if lib is None:
        return 0
    return int(lib.ditq_prepacked_bytes(n, k, bits))


def prepacked_bytes_w4(n: int, k: int, seg: int) -> int:
    """Bytes of the W4A8 prepacked copy of an ``[n, k]`` int4 weight (codes + sums per ``seg`` inputs)."""
    lib = extension.lib()
    if lib is None:
        return 0
    return int(lib.ditq_prepacked_bytes_w4(n, k, seg))
