"""ditq.pipelines.demo: the first-contact run, end to end, kept small."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ditq import models
from ditq.errors import InvalidArgumentError
from ditq.pipelines import demo
from ditq.pipelines.demo import (
    DEMO_CONFIG,
    FASHION_MNIST_CLASSES,
    find_embedded_model,
    run_demo,
    tiny_demo_model,
)


def test_find_embedded_model_is_a_file_or_none():
    path = find_embedded_model()
    assert path is None or (path.is_file() and path.name == "ditq-fmnist.safetensors")


def test_tiny_demo_model_is_small_and_seeded():
    model = tiny_demo_model(seed=3)
    assert model.config == DEMO_CONFIG and not model.training
    assert model.config.num_classes == len(FASHION_MNIST_CLASSES) == 10
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    same = tiny_demo_model(seed=3)
    assert all(
        (a == b).all() for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True)
    )


def test_run_demo_with_the_random_stand_in(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "find_embedded_model", lambda: None)
    lines: list[str] = []
    result = run_demo(tmp_path / "out", samples_per_class=1, steps=2, log=lines.append, train=False)
    assert not result.trained and result.num_samples == 10 and result.training is None
    assert any("randomly initialized" in line for line in lines)
    assert any(str(result.grid_path) in line for line in lines)
    with np.load(result.npz_path) as data:
        assert data["arr_0"].shape == (10, 32, 32, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].tolist() == list(range(10))
    with Image.open(result.grid_path) as im:
        assert im.format == "PNG"


def test_run_demo_loads_the_embedded_model(tmp_path, monkeypatch):
    path = tmp_path / "ditq-fmnist.safetensors"
    models.save(tiny_demo_model(seed=1), path)
    monkeypatch.setattr(demo, "find_embedded_model", lambda: path)
    lines: list[str] = []
    result = run_demo(tmp_path / "out", samples_per_class=1, steps=2, log=lines.append, train=False)
    assert result.trained and result.model_path == path
    assert any("embedded" in line for line in lines)
    assert not any("randomly" in line for line in lines)


def test_run_demo_rejects_nonpositive_counts(tmp_path):
    with pytest.raises(InvalidArgumentError, match="samples_per_class"):
        run_demo(tmp_path, samples_per_class=0, log=lambda _: None)


def test_run_demo_trains_a_tiny_model_and_can_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "find_embedded_model", lambda: None)
    for _ in range(2):  # a second demo replaces the first one's training run
        lines: list[str] = []
        result = run_demo(tmp_path, samples_per_class=1, steps=2, train_steps=3, log=lines.append)
    training = result.training
    assert training is not None and training.steps == 3
    assert training.model_path.is_file() and training.log_path.is_file()
    assert training.last_checkpoint.is_file()
    assert any(line.startswith("loss ") for line in lines)
    assert any(str(training.model_path) in line for line in lines)
    assert models.load(training.model_path).config.input_size == 16
