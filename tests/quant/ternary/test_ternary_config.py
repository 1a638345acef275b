"""ditq.quant.ternary.config: TernaryQATConfig JSON and dict round trips, one-line errors."""

from __future__ import annotations

import pytest

from ditq.errors import InvalidArgumentError
from ditq.quant import TernaryQATConfig


def test_config_json_round_trip():
    cfg = TernaryQATConfig(
        step="convert", scale="gamma", alpha_init="normal", act_bits=8, quantize_adaln=False,
        include=["layers.*"], exclude=["re:layers\\.0\\..*"], preset="large-dit",
    )  # fmt: skip
    text = cfg.to_json()
    assert '"method": "ternary"' in text
    assert TernaryQATConfig.from_json(text) == cfg
    assert TernaryQATConfig.from_dict(TernaryQATConfig().to_dict()) == TernaryQATConfig()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step": "train"}, "step must be one of"),
        ({"scale": "beta"}, "scale must be one of"),
        ({"alpha_init": "zeros"}, "alpha_init must be one of"),
        ({"act_bits": 4}, "act_bits must be one of"),
        ({"quantize_adaln": "yes"}, "quantize_adaln"),
        ({"include": "re:("}, "bad regex"),
        ({"preset": "unet"}, "unknown quantization preset"),
    ],
)
def test_config_errors_are_one_line(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        TernaryQATConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_config_dict_errors():
    with pytest.raises(InvalidArgumentError, match="unknown TernaryQATConfig field"):
        TernaryQATConfig.from_dict({"w_bits": 2})
    with pytest.raises(InvalidArgumentError, match="not a ternary config"):
        TernaryQATConfig.from_dict({"method": "qdit"})
    with pytest.raises(InvalidArgumentError, match="does not parse"):
        TernaryQATConfig.from_json("{nope")
