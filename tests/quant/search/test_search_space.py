"""Granularity search space (ditq.quant.search.space): choices, the baseline and its real costs,
activation groups searched only where dynamic, one-line errors for bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
from search_helpers import CFG, GROUPS, LAYERS, SMALL, one_line, output_error, tiny

from ditq.errors import InvalidArgumentError
from ditq.quant import QDiTConfig, model_size_bytes, quantized_layers, search
from ditq.quant.search import applied, search_space


def test_space_choices_baseline_and_costs():
    model = tiny()
    space = search_space(model, CFG, groups=(256, 0, 64, 32, 128))
    assert space.layers == LAYERS
    assert space.w_choices[0] == GROUPS and space.a_choices[0] == GROUPS  # canonical order
    assert space.w_choices[2] == (32, 64, 128, 0)  # 256 does not divide 128
    assert space.baseline == ((128, 128),) * 5
    assert space.budget.act_params == 2 + 2 + 1 + 2 + 2
    assert space.budget.model_bytes == model_size_bytes(model, space.to_config(space.baseline))
    rng = np.random.default_rng(0)
    for _ in range(5):
        genome = space.random_genome(rng)
        cost = space.cost(genome)
        assert cost.within(space.budget)
        cfg = space.to_config(genome)
        # the byte count is model_size_bytes' own, before and after quantizing
        assert cost.model_bytes == model_size_bytes(model, cfg)
        with applied(model, cfg):
            assert cost.model_bytes == model_size_bytes(model)
            groups = [q.act_quant.group for q in quantized_layers(model).values()]
            assert [a for _, a in genome] == groups
            ins = [q.in_features for q in quantized_layers(model).values()]
            assert cost.act_params == sum(c // g if g else 1 for c, g in zip(ins, groups, strict=True))
    assert space.size == 25**4 * 16


def test_weight_only_keeps_activation_groups_out_of_the_search():
    model = tiny()
    space = search_space(model, QDiTConfig(w_bits=4, a_bits=None, preset=None), groups=GROUPS)
    assert all(a == (0,) for a in space.a_choices)
    assert space.budget.act_params == 0
    assert all(set(ov) == {"w_group"} for ov in space.overrides(space.baseline).values())


def test_bad_space_arguments_are_one_line_errors():
    model = tiny()
    with pytest.raises(InvalidArgumentError) as e:
        search_space(model, CFG, groups=(48, 96))
    msg = one_line(e)
    assert "'l0'" in msg and "256 input channels" in msg and "valid sizes: 1, 2, 4" in msg
    with pytest.raises(InvalidArgumentError) as e:
        search_space(model, CFG, groups=GROUPS, a_groups=(256,))  # l2 has 128 inputs
    assert "'l2'" in one_line(e)
    for bad in ((), (-1,), ("64",), (True,)):
        with pytest.raises(InvalidArgumentError) as e:
            search_space(model, CFG, groups=bad)
        one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        search_space(model, QDiTConfig(include=["nothing.*"]), groups=GROUPS)
    one_line(e)
    fit = output_error(model)
    for kwargs in (
        dict(mutations=8, crossovers=8),  # more than the population
        dict(prescreen=2),  # no proxy
        dict(mutation_prob=1.5),
        dict(population=0),
    ):
        with pytest.raises(InvalidArgumentError) as e:
            search(model, fit, CFG, **{**SMALL, **kwargs})
        one_line(e)
