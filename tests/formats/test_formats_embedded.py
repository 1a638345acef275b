"""The embedded default model shipped in ditq/assets."""

import pytest
import torch

import ditq
from ditq.formats import loader


def test_embedded_model_loads_by_name():
    if loader.embedded_model_path("ditq-fmnist") is None:
        pytest.skip("this install has no embedded model")
    model = ditq.load("ditq-fmnist")
    cfg = model.config
    assert (cfg.in_channels, cfg.input_size, cfg.num_classes) == (1, 32, 10)
    x = torch.zeros(2, 1, 32, 32)
    out = model(x, torch.tensor([10, 900]), torch.tensor([0, 9]))
    assert out.shape == (2, 2, 32, 32) and torch.isfinite(out).all()
    # a trained model: not the adaLN-zero initialization, which outputs exactly zero
    assert out.abs().max() > 0.01
