"""Search state (ditq.quant.search.state): exact resume, stopping at a generation boundary, refusing a
state made differently, and a full disk that keeps the previous state."""

from __future__ import annotations

import json

import pytest
from search_helpers import CFG, SMALL, one_line, output_error, tiny, trace

from ditq import checkpoint
from ditq.errors import InvalidArgumentError, OutputError
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


def test_should_stop_ends_after_the_saved_generation_and_the_same_call_continues(tmp_path):
    model = tiny()
    fit = output_error(model)
    straight = search(model, fit, CFG, **SMALL, seed=5)
    assert not straight.stopped
    path = tmp_path / "state.json"
    asked: list[int] = []

    def should_stop() -> bool:  # a signal arrives during generation 2
        asked.append(json.loads(path.read_text())["generation"])  # asked after the save
        return len(asked) == 2

    stopped = search(model, fit, CFG, **SMALL, seed=5, state_path=path, should_stop=should_stop)
    assert stopped.stopped and stopped.generations == 2 and asked == [1, 2]
    assert json.loads(path.read_text())["generation"] == 2
    resumed = search(model, fit, CFG, **SMALL, seed=5, state_path=path, should_stop=lambda: False)
    assert not resumed.stopped and trace(resumed) == trace(straight)
    with pytest.raises(InvalidArgumentError, match="should_stop"):
        search(model, fit, CFG, **SMALL, should_stop=True)


def test_a_full_disk_keeps_the_previous_state_and_the_same_call_resumes(tmp_path, monkeypatch):
    model = tiny()
    fit = output_error(model)
    path = tmp_path / "state.json"
    search(model, fit, CFG, **{**SMALL, "generations": 1}, seed=5, state_path=path)
    saved = path.read_bytes()
    monkeypatch.setattr(checkpoint, "_written", 0)
    monkeypatch.setenv(checkpoint.FAULT_ENV, "100")
    with pytest.raises(OutputError) as e:
        search(model, fit, CFG, **SMALL, seed=5, state_path=path)
    assert one_line(e).startswith(f"cannot write the search state {path}: the disk is full")
    assert path.read_bytes() == saved and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    assert trace(search(model, fit, CFG, **SMALL, seed=5, state_path=path)) == trace(
        search(model, fit, CFG, **SMALL, seed=5)
    )
