"""QDiTConfig: defaults, per-layer resolution, JSON round trip, one-line errors for bad values."""

from __future__ import annotations

import json

import pytest

from ditq.errors import InvalidArgumentError
from ditq.quant import LayerQuant, QDiTConfig


def test_defaults_are_q_dit_w4a8():
    cfg = QDiTConfig()
    assert (cfg.w_bits, cfg.a_bits, cfg.w_group, cfg.a_group) == (4, 8, 128, 0)
    assert cfg.dynamic and not cfg.w_sym and not cfg.a_sym and not cfg.quantize_adaln
    assert cfg.w_clip == "max" and cfg.preset == "auto" and cfg.include is None and cfg.exclude == []


def test_json_round_trip():
    cfg = QDiTConfig(
        w_bits=3,
        a_bits=6,
        w_group=64,
        a_group=-1,
        w_sym=True,
        w_clip="mse",
        dynamic=False,
        quantize_adaln=True,
        layers={"blocks.0.attn.qkv": {"w_group": 32, "a_bits": None}, "blocks.1.mlp.fc2": {"w_bits": 8}},
        include=["blocks.*", "re:final\\..*"],
        exclude=["blocks.0.mlp.*"],
        preset=None,
    )
    text = cfg.to_json()
    assert json.loads(text)["layers"]["blocks.0.attn.qkv"] == {"w_group": 32, "a_bits": None}
    back = QDiTConfig.from_json(text)
    assert back == cfg
    assert QDiTConfig.from_dict(cfg.to_dict()) == cfg
    assert QDiTConfig.from_json(QDiTConfig().to_json()) == QDiTConfig()


def test_a_bits_16_means_weight_only():
    cfg = QDiTConfig(a_bits=16)
    assert cfg.a_bits is None and cfg.weight_only
    assert QDiTConfig(a_bits=None, layers={"x": {"a_bits": 16}}).layers["x"]["a_bits"] is None
    assert not QDiTConfig(a_bits=None, layers={"x": {"a_bits": 8}}).weight_only


def test_for_layer_applies_overrides():
    cfg = QDiTConfig(
        w_bits=4, a_bits=8, w_group=128, w_sym=True, layers={"a": {"w_group": 32, "a_bits": None}}
    )
    assert cfg.for_layer("a") == LayerQuant(w_bits=4, w_group=32, w_sym=True, a_bits=None)
    assert cfg.for_layer("b") == LayerQuant(w_bits=4, w_group=128, w_sym=True, a_bits=8)
    assert cfg.for_layer() == cfg.for_layer("b")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"w_bits": 1}, "w_bits must be an integer from 2 to 8"),
        ({"w_bits": 4.0}, "w_bits"),
        ({"w_bits": True}, "w_bits"),
        ({"a_bits": 12}, "a_bits"),
        ({"a_bits": 1}, "None/16"),
        ({"w_group": -1}, "w_group must be an integer >= 0"),
        ({"a_group": -2}, "a_group must be an integer >= -1"),
        ({"w_clip": "absmax"}, "unknown clip"),
        ({"w_clip": 1.5}, "ratio must be in (0, 1]"),
        ({"dynamic": "yes"}, "dynamic must be true or false"),
        ({"layers": {"a": {"group": 32}}}, "unknown key(s) group"),
        ({"layers": {"a": {"w_bits": 9}}}, "layers['a'].w_bits"),
        ({"layers": {"a": 4}}, "must be a dict of overrides"),
        ({"include": ["re:blocks.(["]}, "bad regex"),
        ({"exclude": [3]}, "list of name patterns"),
        ({"preset": 3}, "preset"),
    ],
)
def test_bad_values_raise_one_line(kwargs, words):
    with pytest.raises(InvalidArgumentError) as e:
        QDiTConfig(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_from_dict_and_json_errors_are_one_line():
    with pytest.raises(InvalidArgumentError, match="unknown QDiTConfig field"):
        QDiTConfig.from_dict({"w_bits": 4, "wbits": 4})
    with pytest.raises(InvalidArgumentError, match="does not parse"):
        QDiTConfig.from_json("{w_bits: 4")
    with pytest.raises(InvalidArgumentError, match="from a dict"):
        QDiTConfig.from_json("[4]")
