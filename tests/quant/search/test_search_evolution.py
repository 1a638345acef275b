"""The evolutionary search (ditq.quant.search.evolution): determinism, the constraint on every
candidate, activation groups really searched, pre-screening with a proxy, a tiny DiT."""

from __future__ import annotations

from dataclasses import replace

import torch
from search_helpers import CFG, GROUPS, LAYERS, SMALL, output_error, sample_inputs, tiny, trace

from ditq.models import DiT, DiTConfig
from ditq.quant import QDiTConfig, QuantLinear, model_size_bytes, quantized_layers, search
from ditq.quant.search import applied, output_error_proxy, search_space


def test_search_is_deterministic_for_a_seed():
    model = tiny()
    fit = output_error(model)
    a = search(model, fit, CFG, **SMALL, seed=3)
    b = search(model, fit, CFG, **SMALL, seed=3)
    c = search(model, fit, CFG, **SMALL, seed=4)
    assert trace(a) == trace(b)
    assert trace(a)[0] != trace(c)[0]
    assert a.best_fitness <= a.baseline_fitness  # the baseline is in generation 0
    assert a.evaluations == len(a.evaluated) == 30
    assert [h["generation"] for h in a.history] == [0, 1, 2]


def test_every_candidate_respects_the_constraint_and_weights_are_quantized_once():
    model = tiny()
    space = search_space(model, CFG, groups=GROUPS)
    x = sample_inputs()
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
    model = tiny()
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


def test_prescreen_gives_the_real_fitness_to_k_candidates_per_generation():
    model = tiny()
    proxy = output_error_proxy(model, [(sample_inputs()[:4],)])
    calls: list = []
    fit = output_error(model, calls)
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
