"""``ditq train-evaluator`` on tiny fake Fashion-MNIST idx files (the real ones are not needed)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from ditq.cli import train_evaluator
from ditq.cli.main import main


def _write_idx(folder, prefix: str, n: int, seed: int) -> None:
    """idx files of n 28x28 images of 10 textured classes, as the Fashion-MNIST files are laid out."""
    tiles = np.random.default_rng(1234).integers(0, 2, (10, 4, 4)) * 200
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = np.tile(tiles[labels], (1, 7, 7)) + np.random.default_rng(seed).integers(0, 50, (n, 28, 28))
    images = np.clip(images, 0, 255).astype(np.uint8)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.tobytes())


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "fmnist"
    folder.mkdir()
    _write_idx(folder, "train", 160, 0)
    _write_idx(folder, "t10k", 60, 1)
    return folder


def test_train_evaluator_writes_a_loadable_classifier(data, tmp_path, capsys):
    from ditq.eval.fmnist import evaluate_fmnist, load_fmnist_evaluator

    out = tmp_path / "clf.safetensors"
    argv = ["train-evaluator", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "32"]
    assert main([*argv, "--floor-images", "100", "--seed", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "test accuracy" in stdout and "floor FID-FMNIST" in stdout and "160 training" in stdout
    ev = load_fmnist_evaluator(out)
    meta = ev.metadata
    assert meta["num_train_images"] == 160 and meta["num_test_images"] == 60
    assert meta["floor_num_images"] == 100 and meta["train_config"]["seed"] == 3
    assert meta["command"].startswith("ditq train-evaluator --data ") and "--epochs 1" in meta["command"]
    assert f"{meta['test_accuracy']:.4f}" in stdout and f"{meta['floor_fid_fmnist']:.4f}" in stdout
    assert ev.mu.shape == (128,)
    # the reference statistics are the test set's: its own FID-FMNIST is 0
    from ditq.data import load_idx_dataset

    x, y = load_idx_dataset(data, "test")
    scores = evaluate_fmnist(train_evaluator._as_uint8(x), y.numpy(), evaluator=ev)
    assert abs(scores["fid_fmnist"]) < 1e-6 * np.trace(ev.sigma)
    assert scores["class_acc"] == pytest.approx(meta["test_accuracy"])


def test_as_uint8_undoes_load_idx_dataset_exactly(data):
    from ditq.data import load_idx_dataset, read_idx

    x, _ = load_idx_dataset(data, "train")
    raw = read_idx(data / "train-images-idx3-ubyte.gz")
    back = train_evaluator._as_uint8(x)
    assert back.shape == (160, 32, 32, 1) and back.dtype == np.uint8
    assert (back[:, 2:30, 2:30, 0] == raw).all() and (back[:, :2] == 0).all()


def test_cli_defaults_match_the_library():
    from ditq.data.idx import FASHION_MNIST_DIR
    from ditq.eval.fmnist import FMNISTTrainConfig

    d = FMNISTTrainConfig()
    assert train_evaluator.DEFAULT_DATA == str(FASHION_MNIST_DIR)
    assert (d.epochs, d.batch_size, d.lr, d.seed) == (
        train_evaluator.DEFAULT_EPOCHS,
        train_evaluator.DEFAULT_BATCH_SIZE,
        train_evaluator.DEFAULT_LR,
        train_evaluator.DEFAULT_SEED,
    )


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--epochs", "0"], "epochs"),
        (["--floor-images", "1"], "floor-images"),
        (["--data", "/nonexistent/fmnist"], "not found"),
        (["--device", "nonsense"], "device"),
    ],
)
def test_train_evaluator_bad_options_are_one_line_errors(data, tmp_path, capsys, extra, match):
    argv = ["train-evaluator", "--data", str(data), "--out", str(tmp_path / "c.safetensors"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditq: error: ") and err.count("\n") == 1 and match in err
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("fault", ["EROFS", "disk-full"])
def test_an_unwritable_output_is_one_line_and_exit_74(data, tmp_path, capsys, monkeypatch, fault):
    from ditq import checkpoint

    if fault == "EROFS":
        monkeypatch.setenv(checkpoint.FAULT_ERRNO_ENV, "EROFS")
    else:
        monkeypatch.setattr(checkpoint, "_written", 0)
        monkeypatch.setenv(checkpoint.FAULT_ENV, "0")
    out = tmp_path / "clf.safetensors"
    argv = ["train-evaluator", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "32"]
    assert main([*argv, "--floor-images", "100"]) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditq: error: cannot write the ") and str(out) in err[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["fmnist"]
