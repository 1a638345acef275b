"""Search state (ditq.quant.search.state): exact resume, and refusing a state made differently."""

from __future__ import annotations

import json

import pytest
from search_helpers import CFG, SMALL, one_line, output_error, tiny, trace

from ditq.errors import InvalidArgumentError
from ditq.quant import QDiTConfig, search


def test_resume_gives_exactly_the_uninterrupted_result(tmp_path):
    model = tiny()
    calls: list = []
    fit = output_error(model, calls)
    straight = search(model, fit, CFG, **SMALL, seed=5)
    path = tmp_path / "state.json"
    search(model, fit, CFG, **{**SMALL, "generations": 2}, seed=5, state_path=path)
    assert json.loads(path.read_text())["generation"] == 2
    calls.clear()
    logs: list[str] = []
    resumed = search(model, fit, CFG, **SMALL, seed=5, state_path=path, log=logs.append)
    assert trace(resumed) == trace(straight)
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
    assert trace(search(model, fit, CFG, **SMALL, seed=5, state_path=killed)) == trace(straight)


def test_resume_refuses_a_state_made_differently(tmp_path):
    model = tiny()
    fit = output_error(model)
    path = tmp_path / "state.json"
    search(model, fit, CFG, **{**SMALL, "generations": 1}, seed=0, state_path=path)
    with pytest.raises(InvalidArgumentError) as e:
        search(model, fit, CFG, **SMALL, seed=1, state_path=path)
    assert "seed" in one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        search(model, fit, CFG, **{**SMALL, "groups": (64, 128, 0)}, seed=0, state_path=path)
    assert "space" in one_line(e)
    with pytest.raises(InvalidArgumentError) as e:
        search(model, fit, QDiTConfig(w_bits=8, a_bits=4, preset=None), **SMALL, state_path=path)
    assert "config" in one_line(e)
    path.write_text('{"format": "something else"}')
    with pytest.raises(InvalidArgumentError) as e:
        search(model, fit, CFG, **SMALL, state_path=path)
    one_line(e)
