"""``ditq demo`` end to end in a temporary folder (few steps, one sample per class)."""

from __future__ import annotations

import numpy as np

from ditq.cli.main import main
from ditq.eval.fmnist import default_evaluator_path


def test_demo_writes_grid_and_npz(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--steps",
        "2",
        "--samples-per-class",
        "1",
        "--seed",
        "1",
        "--ptq-samples",
        "0",
        "--ternary-steps",
        "0",
        "--skip-deploy",
    ]
    assert main([*argv, "--train-steps", "2", "--eval-samples", "20"]) == 0
    stdout = capsys.readouterr().out
    assert str(out / "grid.png") in stdout and str(out / "samples.npz") in stdout
    assert "loss " in stdout and str(out / "train" / "model.safetensors") in stdout
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (10, 32, 32, 3)
        assert data["arr_1"].tolist() == list(range(10))
    if default_evaluator_path() is not None:  # the shipped FID-FMNIST classifier scores the samples
        assert "FID-FMNIST " in stdout and "on 20 samples" in stdout and "floor" in stdout
        with np.load(out / "eval_samples.npz") as data:
            assert data["arr_0"].shape == (20, 32, 32, 3)


def test_demo_quiet_prints_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--steps",
        "2",
        "--samples-per-class",
        "1",
        "--quiet",
        "--skip-train",
        "--ptq-samples",
        "0",
        "--ternary-steps",
        "0",
        "--skip-deploy",
    ]
    argv += ["--eval-samples", "10"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert (out / "grid.png").is_file()


def test_demo_bad_count_is_a_one_line_error(tmp_path, capsys):
    for flag in ("--samples-per-class", "--eval-samples"):
        assert main(["demo", "--out", str(tmp_path), flag, "-1" if flag == "--eval-samples" else "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ditq: error: ") and err.count("\n") == 1


def test_demo_cli_defaults_match_the_pipeline():
    from ditq.cli.main import build_parser
    from ditq.pipelines.demo import DEMO_DISTILL_STEPS, DEMO_EVAL_SAMPLES, DEMO_TRAIN_STEPS

    args = build_parser().parse_args(["demo"])
    assert args.eval_samples == DEMO_EVAL_SAMPLES and args.train_steps == DEMO_TRAIN_STEPS
    assert args.ternary_steps == DEMO_DISTILL_STEPS and not args.skip_deploy
