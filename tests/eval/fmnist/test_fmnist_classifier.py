"""The FID-FMNIST classifier (ditq.eval.fmnist.classifier): shapes and size."""

from __future__ import annotations

import torch

from ditq.eval.fmnist import FMNISTClassifier


def test_classifier_shapes_and_size():
    model = FMNISTClassifier().eval()
    x = torch.randn(3, 1, 32, 32)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 128)
    assert model.config.feature_dim == 128
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 300_000  # float16: < 1 MB
