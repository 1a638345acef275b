"""Layer-config files (ditq.quant.search.layer_config): round trip, one-line errors."""

from __future__ import annotations

import pytest
from search_helpers import CFG, SMALL, one_line, output_error, tiny

from ditq.errors import InvalidArgumentError
from ditq.quant import QDiTConfig, quantize_, quantized_layers, read_layer_config, search, write_layer_config


def test_layer_config_round_trip_applies(tmp_path):
    model = tiny()
    result = search(model, output_error(model), CFG, **{**SMALL, "generations": 2})
    path = write_layer_config(tmp_path / "layers.json", result, {"command": "test"})
    doc = read_layer_config(path)
    assert doc["format"] == "ditq-layer-config" and doc["version"] == 1
    assert doc["layers"] == result.layers
    assert doc["meta"]["command"] == "test" and doc["meta"]["best_fitness"] == result.best_fitness
    fresh = tiny()
    quantize_(fresh, QDiTConfig(w_bits=4, a_bits=4, preset=None, layers=doc["layers"]))
    for name, q in quantized_layers(fresh).items():
        assert (q.w_group, q.act_quant.group) == (
            result.layers[name]["w_group"],
            result.layers[name]["a_group"],
        )
    # a plain dict works too
    write_layer_config(tmp_path / "plain.json", {"l0": {"w_group": 64}})
    assert read_layer_config(tmp_path / "plain.json")["layers"] == {"l0": {"w_group": 64}}


def test_layer_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    cases = [
        '{"format": "ditq-checkpoint", "layers": {}}',
        '{"format": "ditq-layer-config", "version": 99, "layers": {}}',
        '{"format": "ditq-layer-config", "version": 1, "layers": {"l0": {"w_group": "x"}}}',
        '{"format": "ditq-layer-config", "version": 1, "layers": {"l0": {"group": 32}}}',
        "not json",
        "[1, 2]",
    ]
    for text in cases:
        bad.write_text(text)
        with pytest.raises(InvalidArgumentError) as e:
            read_layer_config(bad)
        assert str(bad) in one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        read_layer_config(tmp_path / "missing.json")
    one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        write_layer_config(tmp_path / "x.json", {"l0": {"w_group": -3}})
    one_line(e)
    # names and group sizes are checked against the model when applied
    for layers in ({"blocks.9.fc": {"w_group": 64}}, {"l2": {"a_group": 256}}):
        write_layer_config(bad, layers)
        with pytest.raises(InvalidArgumentError) as e:
            quantize_(tiny(), QDiTConfig(preset=None, layers=read_layer_config(bad)["layers"]))
        one_line(e)
