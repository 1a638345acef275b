"""Packing layouts: round trips, the documented bit positions, the official TerDiT fixture, errors."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels import (
    PackingError,
    pack_2bit,
    pack_int4,
    pack_ternary,
    packed_2bit_shape,
    repack_2bit,
    unpack_2bit,
    unpack_int4,
    unpack_ternary,
)


def _codes(out, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (out, k), generator=g, dtype=torch.uint8)


def test_int4_round_trip_and_nibble_order():
    c = _codes(6, 10, 4)
    p = pack_int4(c)
    assert p.shape == (6, 5) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), c)
    hand = torch.tensor([[0x1, 0xF, 0x7, 0x2]], dtype=torch.uint8)
    assert pack_int4(hand).tolist() == [[0xF1, 0x27]]  # low nibble = even input


@pytest.mark.parametrize("layout", ["terdit", "k4"])
def test_2bit_round_trips(layout):
    c = _codes(8, 12, 2, seed=1)
    p = pack_2bit(c, layout)
    assert p.shape == packed_2bit_shape(8, 12, layout)
    assert torch.equal(unpack_2bit(p, layout), c)
    other = "k4" if layout == "terdit" else "terdit"
    assert torch.equal(unpack_2bit(repack_2bit(p, layout, other), other), c)


def test_2bit_bit_positions_by_hand():
    c = torch.tensor([[1], [2], [3], [0]], dtype=torch.uint8)  # out=4, in=1
    assert pack_2bit(c, "terdit").tolist() == [[0b01_10_11_00]]
    k = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)  # out=1, in=4
    assert pack_2bit(k, "k4").tolist() == [[0b00_11_10_01]]


def test_ternary_round_trip_and_codes():
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-1, 2, (8, 16), generator=g, dtype=torch.int8)
    for layout in ("terdit", "k4"):
        assert torch.equal(unpack_ternary(pack_ternary(w, layout), layout), w)
    assert torch.equal(unpack_ternary(pack_ternary(w.float())), w)
    with pytest.raises(PackingError, match="code 3"):
        unpack_ternary(torch.full((1, 1), 0xFF, dtype=torch.uint8))


def test_official_terdit_fixture_unpacks(terdit_ref):
    ref = terdit_ref
    packed = ref["ternary_example_packed"]
    assert torch.equal(unpack_ternary(packed, "terdit"), ref["ternary_example_unpacked"])
    assert torch.equal(pack_ternary(ref["ternary_example_unpacked"], "terdit"), packed)
    key = ref["ternary_example2_key"]
    assert torch.equal(unpack_ternary(ref["state_dict"][key], "terdit"), ref["ternary_example2_unpacked"])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: pack_2bit(_codes(5, 4, 2), "terdit"), "output features divisible by 4, got 5"),
        (lambda: pack_2bit(_codes(4, 6, 2), "k4"), "input features divisible by 4, got 6"),
        (lambda: pack_2bit(_codes(4, 4, 3), "k4"), "codes must be < 4"),
        (lambda: pack_2bit(_codes(4, 4, 2), "rows"), "unknown 2-bit layout"),
        (lambda: pack_int4(_codes(2, 3, 4)), "even number of inputs"),
        (lambda: pack_int4(torch.zeros(2, 2, dtype=torch.int32)), "must be uint8"),
        (lambda: pack_ternary(torch.tensor([[2, 0, 0, 0]])), "only -1, 0 and \\+1"),
        (lambda: packed_2bit_shape(6, 4, "terdit"), "divisible by 4, got 6"),
    ],
)
def test_errors_are_one_line(call, message):
    with pytest.raises(PackingError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
