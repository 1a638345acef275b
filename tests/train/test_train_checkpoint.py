"""Training-state stores (ditq.train.checkpoint): keep-last-K checkpoint folders and clear errors on
bad files."""

from __future__ import annotations

import pytest
import torch

from ditq.errors import CheckpointError
from ditq.train.checkpoint import CheckpointDir, SingleFileState, load_state


def _state(step):
    return {"step": step, "model": {"w": torch.full((2,), float(step))}}


def test_checkpoint_dir_keeps_the_last_k(tmp_path):
    store = CheckpointDir(tmp_path / "ckpt", keep_last=2)
    assert store.latest() is None and store.list() == []
    for step in (5, 10, 15):
        path = store.save(step, _state(step))
        assert path.name == f"step_{step:07d}.pt"
    (tmp_path / "ckpt" / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "ckpt" / ".step_0000020.pt.123.tmp").write_text("a write cut off")
    assert [s for s, _ in store.list()] == [10, 15]
    assert store.latest() == tmp_path / "ckpt" / "step_0000015.pt"
    assert load_state(store.latest())["model"]["w"].tolist() == [15.0, 15.0]


def test_keep_last_zero_keeps_all(tmp_path):
    store = CheckpointDir(tmp_path, keep_last=0)
    for step in range(1, 5):
        store.save(step, _state(step))
    assert [s for s, _ in store.list()] == [1, 2, 3, 4]


def test_single_file_state(tmp_path):
    store = SingleFileState(tmp_path / "state.pt")
    assert store.latest() is None
    store.save(1, _state(1))
    store.save(2, _state(2))
    assert load_state(store.latest())["step"] == 2


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be read") as e:
        load_state(tmp_path / "junk.pt")
    assert "\n" not in str(e.value)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ditq training state"):
        load_state(tmp_path / "other.pt")
