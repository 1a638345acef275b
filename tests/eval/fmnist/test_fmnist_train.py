"""Training the classifier (ditq.eval.fmnist.train): it learns, deterministically; shifts; bad settings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fmnist_helpers import FAST, TINY, one_line, textures

from ditq.errors import InvalidArgumentError
from ditq.eval.fmnist import FMNISTClassifier, FMNISTTrainConfig, classifier_accuracy, train_fmnist_classifier


def test_training_learns_separable_classes_and_is_deterministic():
    x, y = textures(320, 0)
    xt, yt = textures(200, 1)
    untrained = FMNISTClassifier(TINY).eval()
    model = train_fmnist_classifier(x, y, FAST, model_config=TINY)
    assert not model.training
    acc, per_class = classifier_accuracy(model, xt, yt)
    assert acc > 0.4 > classifier_accuracy(untrained, xt, yt)[0]  # chance is 0.1; 30 steps
    assert len(per_class) == 10
    again = train_fmnist_classifier(x, y, FAST, model_config=TINY)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = train_fmnist_classifier(x, y, replace(FAST, seed=1), model_config=TINY)
    assert not torch.equal(other.head.weight, model.head.weight)


def test_random_shift_keeps_shape_and_fills_black():
    from ditq.eval.fmnist.train import _random_shift

    x = torch.ones(5, 1, 32, 32)
    out = _random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and set(out.unique().tolist()) <= {-1.0, 1.0}
    assert (out == -1).any()  # some image moved, bringing in the black border
    assert torch.equal(_random_shift(x, 0, torch.Generator()), x)


def test_bad_training_settings_are_one_line_errors():
    for kwargs in ({"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"max_shift": -1}):
        with pytest.raises(InvalidArgumentError) as e:
            FMNISTTrainConfig(**kwargs)
        one_line(e)
