"""``ditq demo`` end to end in a temporary folder (few steps, one sample per class)."""

from __future__ import annotations

import numpy as np

from ditq.cli.main import main


def test_demo_writes_grid_and_npz(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "2", "--samples-per-class", "1", "--seed", "1"]
    assert main([*argv, "--train-steps", "2"]) == 0
    stdout = capsys.readouterr().out
    assert str(out / "grid.png") in stdout and str(out / "samples.npz") in stdout
    assert "loss " in stdout and str(out / "train" / "model.safetensors") in stdout
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (10, 32, 32, 3)
        assert data["arr_1"].tolist() == list(range(10))


def test_demo_quiet_prints_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "2", "--samples-per-class", "1", "--quiet", "--skip-train"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (out / "grid.png").is_file()


def test_demo_bad_count_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--samples-per-class", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: ") and err.count("\n") == 1
