"""Granularities: group lengths, parsing, and one-line errors for bad bits and group sizes."""

from __future__ import annotations

import pytest

from ditq.errors import InvalidArgumentError
from ditq.quant.granularity import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    PerTokenGroup,
    act_granularity,
    check_bits,
    group_length,
    num_groups,
    parse_granularity,
    valid_group_sizes,
    weight_granularity,
)


def test_group_lengths():
    assert group_length(PerTensor(), 96) is None
    assert group_length(PerChannel(), 96) == 96
    assert group_length(PerToken(), 96) == 96
    assert group_length(PerGroup(32), 96) == 32
    assert group_length(PerTokenGroup(48), 96) == 48
    assert group_length(PerGroup(0), 96) == 96  # 0 = per channel, as in Q-DiT
    assert num_groups(PerGroup(32), 96) == 3
    assert num_groups(PerTensor(), 96) == 1


def test_q_dit_group_size_helpers():
    assert weight_granularity(0) == PerChannel()
    assert weight_granularity(128) == PerGroup(128)
    assert act_granularity(0) == PerToken()
    assert act_granularity(64) == PerTokenGroup(64)


def test_granularities_are_frozen_and_hashable():
    g = PerGroup(32)
    with pytest.raises(AttributeError):
        g.group_size = 64
    assert len({PerGroup(32), PerGroup(32), PerTokenGroup(32)}) == 2


@pytest.mark.parametrize("g", [PerTensor(), PerChannel(), PerGroup(128), PerToken(), PerTokenGroup(32)])
def test_parse_roundtrips_str(g):
    assert parse_granularity(str(g)) == g
    assert parse_granularity(g) is g


def test_valid_group_sizes():
    assert valid_group_sizes(96) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]


def test_bits_accepted():
    for b in range(2, 9):
        assert check_bits(b) == b


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True, "4", None])
def test_bad_bits_one_line(bits):
    with pytest.raises(InvalidArgumentError) as e:
        check_bits(bits)
    assert "2 to 8" in _one_line(e)


def test_group_not_dividing_lists_valid_sizes():
    with pytest.raises(InvalidArgumentError) as e:
        group_length(PerGroup(40), 96, layer="blocks.0.attn.qkv")
    msg = _one_line(e)
    assert "40" in msg and "blocks.0.attn.qkv" in msg and "input channels" in msg
    assert "1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96" in msg
    with pytest.raises(InvalidArgumentError) as e:
        group_length(PerTokenGroup(7), 64)
    assert "1, 2, 4, 8, 16, 32, 64" in _one_line(e)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: PerGroup(-1),
        lambda: PerGroup(1.5),
        lambda: PerTokenGroup(True),
        lambda: parse_granularity("group"),
        lambda: parse_granularity("blocks"),
        lambda: parse_granularity(32),
        lambda: group_length("channel", 8),
        lambda: group_length(None, 8),
    ],
)
def test_bad_granularity_one_line(bad):
    with pytest.raises(InvalidArgumentError) as e:
        bad()
    _one_line(e)


def test_quant_imports_no_models_diffusion_or_eval():
    """DESIGN.md: quant sees tensors and modules, never the model, diffusion or eval packages."""
    import subprocess
    import sys

    code = (
        "import sys, ditq.quant; "
        "bad = [m for m in sys.modules if m.split('.')[:2] in "
        "(['ditq', 'models'], ['ditq', 'diffusion'], ['ditq', 'eval'])]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
