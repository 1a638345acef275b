"""``ditq train`` end to end on tiny synthetic runs; flags over --set over the config file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditq.checkpoint import read_metadata
from ditq.cli.main import main
from ditq.train.config import TrainRun

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synthetic_tiny.yaml")
# Shrink the tiny recipe further: 8x8 images (4 tokens), 40 of them, one block.
TINY = ["--set", "data.image_size=8", "--set", "data.num_samples=40", "--set", "model.overrides.depth=1"]
TINY += ["--set", "optim.log_every=1", "--set", "checkpoint.every=1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: intra-op threads cost more than they save, most of all on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_writes_the_run_and_flags_win(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", CONFIG, "--out", str(out), "--steps", "3", "--lr", "0.002", *TINY]
    assert main([*argv, "--set", "optim.lr=0.5", "--set", "optim.steps=50"]) == 0
    stdout = capsys.readouterr().out
    assert "training a" in stdout and "step 3: loss" in stdout and str(out / "model.safetensors") in stdout
    run = TrainRun.load(out / "config.yaml")
    assert run.optim.steps == 3 and run.optim.lr == 0.002  # flags beat --set
    assert run.data.image_size == 8 and run.optim.batch_size == 32  # --set and the file
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002.pt", "step_0000003.pt"]
    command = read_metadata(out / "model.safetensors")["command"]
    assert command.startswith("ditq train --config ") and "--steps 3" in command


def test_resume_reads_the_runs_own_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", CONFIG, "--out", str(out), "--steps", "2", "--quiet", *TINY]) == 0
    assert capsys.readouterr().out == ""
    assert main(["train", "--resume", "--out", str(out), "--steps", "4"]) == 0
    stdout = capsys.readouterr().out
    assert "resuming from step 2" in stdout and "step 4: loss" in stdout
    assert read_metadata(out / "model.safetensors")["train_steps"] == 4


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: ") and err.count("\n") == 1
    return err


def test_bad_configs_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  stepz: 10\n")
    assert "unknown key stepz in optim" in _error(["train", "--config", str(bad)], capsys)
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"out: {tmp_path / 'o'}\ndata:\n  kind: folder\n  path: {tmp_path / 'no-such-dir'}\n")
    assert "data.path not found" in _error(["train", "--config", str(missing)], capsys)
    argv = ["train", "--config", CONFIG, "--out", str(tmp_path / "x"), "--set", "optim.lr=-1"]
    assert "optim.lr must be positive" in _error(argv, capsys)
    assert "config file not found" in _error(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert "give a run config" in _error(["train"], capsys)
    assert "--resume needs the run's folder" in _error(["train", "--resume"], capsys)
    assert "--set takes KEY=VALUE" in _error(["train", "--config", CONFIG, "--set", "lr"], capsys)


def test_an_existing_run_needs_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", CONFIG, "--out", str(out), "--steps", "1", "--quiet", *TINY]) == 0
    argv = ["train", "--config", CONFIG, "--out", str(out), "--steps", "1", *TINY]
    assert "pass --resume" in _error(argv, capsys)
