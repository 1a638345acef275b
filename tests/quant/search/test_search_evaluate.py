"""Applying candidates (ditq.quant.search.evaluate): in place, always restored, never copied."""

from __future__ import annotations

import copy

import pytest
import torch
from search_helpers import CFG, SMALL, output_error, tiny

from ditq.quant import QDiTConfig, QuantLinear, search
from ditq.quant.search import applied


def test_applied_restores_the_same_modules_even_on_error():
    model = tiny()
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
    model = tiny()
    before = {n: m for n, m in model.named_modules()}
    fit = output_error(model)

    def no_copy(*args, **kwargs):
        raise AssertionError("deepcopy called")

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    search(model, fit, CFG, **SMALL)
    assert {n: m for n, m in model.named_modules()} == before
