"""Granularity search: the space and its real costs, the constraint, activation groups really searched,
in-place application that always restores the model (no copies), determinism, exact resume,
pre-screening with a proxy, layer-config files, one-line errors."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq.errors import InvalidArgumentError
from ditq.models import DiT, DiTConfig
from ditq.quant import (
    QDiTConfig,
    QuantLinear,
    applied,
    model_size_bytes,
    output_error_proxy,
    quantize_,
    quantized_layers,
    read_layer_config,
    search,
    search_space,
    write_layer_config,
)

GROUPS = (32, 64, 128, 256, 0)
CFG = QDiTConfig(w_bits=4, a_bits=4, preset=None)
SMALL = dict(groups=GROUPS, population=10, generations=3, top_k=4, mutations=4, crossovers=4)
LAYERS = ("l0", "l1", "l2", "l3", "l4")


class Tiny(nn.Module):
    """Five linears; l2 has 128 inputs (group 256 does not fit), the others 256."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(256, 256), nn.Linear(256, 128), nn.Linear(128, 256)
        self.l3, self.l4 = nn.Linear(256, 256), nn.Linear(256, 64)

    def forward(self, x):
        for layer in (self.l0, self.l1, self.l2, self.l3):
            x = F.gelu(layer(x))  # [B, C]
        return self.l4(x)  # [B, 64]


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def _x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 256, generator=g) * torch.linspace(0.1, 3.0, 256)  # uneven channel ranges


def _output_error(model: nn.Module, calls: list | None = None):
    """Relative output error vs the float model; the reference is computed once, here."""
    x = _x()
    with torch.no_grad():
        ref = model(x)

    def fitness(m):
        if calls is not None:
            calls.append(1)
        return float((m(x) - ref).pow(2).mean() / ref.pow(2).mean())

    return fitness


def _trace(result):
    """Everything deterministic about a result (not the seconds)."""
    return (
        [(c.genome, c.fitness, c.proxy, c.generation) for c in result.evaluated],
        [c for c in result.best],
        [{k: v for k, v in h.items() if k != "seconds"} for h in result.history],
    )


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ----------------------------------------------------------------------------
# Space and cost
# ----------------------------------------------------------------------------


def test_space_choices_baseline_and_costs():
    model = _tiny()
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
    model = _tiny()
    space = search_space(model, QDiTConfig(w_bits=4, a_bits=None, preset=None), groups=GROUPS)
    assert all(a == (0,) for a in space.a_choices)
    assert space.budget.act_params == 0
    assert all(set(ov) == {"w_group"} for ov in space.overrides(space.baseline).values())


def test_bad_space_arguments_are_one_line_errors():
    model = _tiny()
    with pytest.raises(InvalidArgumentError) as e:
        search_space(model, CFG, groups=(48, 96))
    msg = _one_line(e)
    assert "'l0'" in msg and "256 input channels" in msg and "valid sizes: 1, 2, 4" in msg
    with pytest.raises(InvalidArgumentError) as e:
        search_space(model, CFG, groups=GROUPS, a_groups=(256,))  # l2 has 128 inputs
    assert "'l2'" in _one_line(e)
    for bad in ((), (-1,), ("64",), (True,)):
        with pytest.raises(InvalidArgumentError) as e:
            search_space(model, CFG, groups=bad)
        _one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        search_space(model, QDiTConfig(include=["nothing.*"]), groups=GROUPS)
    _one_line(e)
    fit = _output_error(model)
    for kwargs in (
        dict(mutations=8, crossovers=8),  # more than the population
        dict(prescreen=2),  # no proxy
        dict(mutation_prob=1.5),
        dict(population=0),
    ):
        with pytest.raises(InvalidArgumentError) as e:
            search(model, fit, CFG, **{**SMALL, **kwargs})
        _one_line(e)


# ----------------------------------------------------------------------------
# Applying candidates: in place, always restored, never copied
# ----------------------------------------------------------------------------


def test_applied_restores_the_same_modules_even_on_error():
    model = _tiny()
    before = {n: m for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = QDiTConfig(w_bits=4, a_bits=4, preset=None, w_group=64, a_group=32)
    with pytest.raises(RuntimeError, match="boom"):
        with applied(model, cfg) as m:
            assert m is model and isinstance(model.l0, QuantLinear)
            assert model.l0.act_quant.group == 32
            raise RuntimeError("boom")
    assert {n: m for n, m in model.named_modules()} == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    def failing(m):
        raise RuntimeError("fitness failed")

    with pytest.raises(RuntimeError, match="fitness failed"):
        search(model, failing, CFG, **SMALL)
    assert {n: m for n, m in model.named_modules()} == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_search_never_deep_copies_and_leaves_the_model_as_it_was(monkeypatch):
    model = _tiny()
    before = {n: m for n, m in model.named_modules()}
    fit = _output_error(model)

    def no_copy(*args, **kwargs):
        raise AssertionError("deepcopy called")

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    search(model, fit, CFG, **SMALL)
    assert {n: m for n, m in model.named_modules()} == before


# ----------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------


def test_search_is_deterministic_for_a_seed():
    model = _tiny()
    fit = _output_error(model)
    a = search(model, fit, CFG, **SMALL, seed=3)
    b = search(model, fit, CFG, **SMALL, seed=3)
    c = search(model, fit, CFG, **SMALL, seed=4)
    assert _trace(a) == _trace(b)
    assert _trace(a)[0] != _trace(c)[0]
    assert a.best_fitness <= a.baseline_fitness  # the baseline is in generation 0
    assert a.evaluations == len(a.evaluated) == 30
    assert [h["generation"] for h in a.history] == [0, 1, 2]


def test_every_candidate_respects_the_constraint_and_weights_are_quantized_once():
    model = _tiny()
    space = search_space(model, CFG, groups=GROUPS)
    x = _x()
    with torch.no_grad():
        ref = model(x)
    weight_calls = []

    def weights(name, w_group):  # stands in for GPTQ: codes of one layer at one group size
        weight_calls.append((name, w_group))
        q = QuantLinear.from_float(model.get_submodule(name), replace(CFG.for_layer(name), w_group=w_group))
        return q.qweight, q.w_scale, q.w_zero

    def fitness(m):
        # measured on the modules the fitness sees, independently of the search's own bookkeeping
        qs = quantized_layers(m)
        assert list(qs) == list(LAYERS)
        assert model_size_bytes(m) <= space.budget.model_bytes
        per_token = sum(q.in_features // q.act_quant.group if q.act_quant.group else 1 for q in qs.values())
        assert per_token <= space.budget.act_params
        return float((m(x) - ref).pow(2).mean())

    result = search(model, fitness, CFG, **{**SMALL, "generations": 4}, weights=weights, seed=1)
    assert all(c.cost.within(space.budget) for c in result.evaluated)
    assert result.best_cost.within(result.baseline_cost)
    assert len(weight_calls) == len(set(weight_calls))  # once per (layer, group), for the whole search
    assert result.best_cost.model_bytes == model_size_bytes(model, result.config)


def test_search_really_changes_activation_groups():
    model = _tiny()
    seen = []

    def fitness(m):  # rewards fine activation groups on l0 only; everything else is free
        seen.append(tuple(m.get_submodule(n).act_quant.group for n in LAYERS))
        return (m.l0.act_quant.group or 256) / 256

    result = search(model, fitness, CFG, **SMALL, seed=0)
    assert seen == [tuple(a for _, a in c.genome) for c in result.evaluated]  # applied as searched
    # 32 on l0 would need 6 fewer activation parameters elsewhere than exist: 64 is the feasible optimum
    assert result.layers["l0"]["a_group"] == 64 and result.best_fitness == 0.25
    assert result.baseline_fitness == 0.5
    assert result.best_cost.act_params <= result.baseline_cost.act_params
    with applied(model, result.config):
        assert model.l0.act_quant.group == 64
        assert {n: q.act_quant.group for n, q in quantized_layers(model).items()} == {
            n: ov["a_group"] for n, ov in result.layers.items()
        }


def test_resume_gives_exactly_the_uninterrupted_result(tmp_path):
    model = _tiny()
    calls: list = []
    fit = _output_error(model, calls)
    straight = search(model, fit, CFG, **SMALL, seed=5)
    path = tmp_path / "state.json"
    search(model, fit, CFG, **{**SMALL, "generations": 2}, seed=5, state_path=path)
    assert json.loads(path.read_text())["generation"] == 2
    calls.clear()
    logs: list[str] = []
    resumed = search(model, fit, CFG, **SMALL, seed=5, state_path=path, log=logs.append)
    assert _trace(resumed) == _trace(straight)
    assert len(calls) == straight.history[2]["evaluations"]  # only the new generation was evaluated
    assert "resumed" in logs[0] and "generation 3/3" in logs[1]

    # a run killed inside generation 1 resumes from generation 0's state
    killed = tmp_path / "killed.json"
    count = []

    def dies(m):
        count.append(1)
        if len(count) == 14:
            raise KeyboardInterrupt
        return fit(m)

    with pytest.raises(KeyboardInterrupt):
        search(model, dies, CFG, **SMALL, seed=5, state_path=killed)
    assert json.loads(killed.read_text())["generation"] == 1
    assert _trace(search(model, fit, CFG, **SMALL, seed=5, state_path=killed)) == _trace(straight)


def test_resume_refuses_a_state_made_differently(tmp_path):
    model = _tiny()
    fit = _output_error(model)
    path = tmp_path / "state.json"
    search(model, fit, CFG, **{**SMALL, "generations": 1}, seed=0, state_path=path)
    with pytest.raises(InvalidArgumentError) as e:
        search(model, fit, CFG, **SMALL, seed=1, state_path=path)
    assert "seed" in _one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        search(model, fit, CFG, **{**SMALL, "groups": (64, 128, 0)}, seed=0, state_path=path)
    assert "space" in _one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        search(model, fit, QDiTConfig(w_bits=8, a_bits=4, preset=None), **SMALL, state_path=path)
    assert "config" in _one_line(e)
    path.write_text('{"format": "something else"}')
    with pytest.raises(InvalidArgumentError) as e:
        search(model, fit, CFG, **SMALL, state_path=path)
    _one_line(e)


def test_prescreen_gives_the_real_fitness_to_k_candidates_per_generation():
    model = _tiny()
    proxy = output_error_proxy(model, [(_x()[:4],)])
    calls: list = []
    fit = _output_error(model, calls)
    k = 3
    result = search(model, fit, CFG, **SMALL, proxy=proxy, prescreen=k, seed=2)
    assert all(h["evaluations"] <= k for h in result.history)
    assert all(h["proxy_evaluations"] == h["candidates"] == 10 for h in result.history)
    assert len(calls) == sum(h["evaluations"] for h in result.history) == result.evaluations
    assert all(c.proxy is not None for c in result.evaluated)
    assert sum(c.fitness is None for c in result.evaluated) == 30 - len(calls)
    assert result.evaluated[0].genome == result.baseline and result.evaluated[0].fitness is not None
    assert result.best_fitness is not None and result.best_fitness <= result.baseline_fitness


def test_tiny_dit_search_and_proxy():
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10))
    model.eval()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.tensor([1, 2]))
    proxy = output_error_proxy(model, [batch], output=lambda out: out[:, :4])  # the noise prediction
    cfg = QDiTConfig(w_bits=4, a_bits=4)
    result = search(model, proxy, cfg, groups=(16, 32, 64, 0), population=6, generations=2, top_k=3,
                    mutations=2, crossovers=2)  # fmt: skip
    assert result.layer_names[0] == "blocks.0.attn.qkv" and len(result.layer_names) == 8
    # 128 divides only fc2's 256 inputs: the baseline is per channel / per token elsewhere
    assert result.baseline[0] == (0, 0) and result.baseline[3] == (128, 128)
    assert result.best_fitness <= result.baseline_fitness
    assert all(type(m) is not QuantLinear for m in model.modules())


# ----------------------------------------------------------------------------
# Layer-config files
# ----------------------------------------------------------------------------


def test_layer_config_round_trip_applies(tmp_path):
    model = _tiny()
    result = search(model, _output_error(model), CFG, **{**SMALL, "generations": 2})
    path = write_layer_config(tmp_path / "layers.json", result, {"command": "test"})
    doc = read_layer_config(path)
    assert doc["format"] == "ditq-layer-config" and doc["version"] == 1
    assert doc["layers"] == result.layers
    assert doc["meta"]["command"] == "test" and doc["meta"]["best_fitness"] == result.best_fitness
    fresh = _tiny()
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
        assert str(bad) in _one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        read_layer_config(tmp_path / "missing.json")
    _one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        write_layer_config(tmp_path / "x.json", {"l0": {"w_group": -3}})
    _one_line(e)
    # names and group sizes are checked against the model when applied
    for layers in ({"blocks.9.fc": {"w_group": 64}}, {"l2": {"a_group": 256}}):
        write_layer_config(bad, layers)
        with pytest.raises(InvalidArgumentError) as e:
            quantize_(_tiny(), QDiTConfig(preset=None, layers=read_layer_config(bad)["layers"]))
        _one_line(e)
